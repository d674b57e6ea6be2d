"""Calibration and mixed-precision quantization (QuantPlan) for every target."""
