"""Compile targets: one sub-package per backend behind one small interface."""
