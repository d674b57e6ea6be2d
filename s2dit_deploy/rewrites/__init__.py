"""Numerically equivalent, device-friendly module swaps applied to a float model.

``rewrite_for_ane(dit, grid, window)`` returns a new Neural-Engine-layout S2DiT (the input is never
modified); ``rewrite_stage(stage)`` does the same for a whole deployment stage, with the host <->
device I/O maps a compiled artifact needs.
"""

from .ane_dit import AneOptions, AneS2DiT, rewrite_dit
from .device_io import IOMap
from .stage_rewrite import DeviceStage, identity_stage, max_abs_error, rewrite_stage

rewrite_for_ane = rewrite_dit

__all__ = ["AneOptions", "AneS2DiT", "DeviceStage", "IOMap", "identity_stage", "max_abs_error",
           "rewrite_dit", "rewrite_for_ane", "rewrite_stage"]
