"""Options of the ``executorch-xnnpack`` target, as plain data (no ExecuTorch import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2dit_deploy.targets.option_checks import require_at_least

# kept equal to quantize.SCHEMES (tests/test_target_options.py checks it) without importing torch
SCHEMES = ("none", "int8", "int8-dynamic", "8da4w")


@dataclass(frozen=True)
class XnnpackOptions:
    """What ``XnnpackTarget.compile`` takes; a QuantPlan (``--quant``) overrides ``xnnpack_quant``."""

    precision: str = field(default="fp32", metadata={
        "doc": "compute precision of float ops (XNNPACK here runs fp32)", "choices": ("fp32",)})
    xnnpack_quant: str = field(default="none", metadata={
        "doc": "whole-graph XNNPACK scheme when no --quant plan is given", "choices": SCHEMES})
    calibration_batches: int = field(default=16, metadata={
        "doc": "at most this many recorded calibration calls per stage (static int8 / plans)"})
    etrecord: bool = field(default=False, metadata={
        "doc": "also write <stage>.etrecord so bench profiles name the delegated ops"})

    def __post_init__(self):
        require_at_least(self, "calibration_batches", 1)
