"""Options of the ``executorch-xnnpack`` target, as plain data (no ExecuTorch import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2dit_deploy.targets.option_checks import require_at_least

# kept equal to quantize.SCHEMES (tests/test_target_options.py checks it) without importing torch
SCHEMES = ("none", "int8", "int8-dynamic", "8da4w")
EXTERNAL_WEIGHTS = ("auto", "always", "never")
# ``external_weights=auto`` moves a stage's weights to a .ptd above this many bytes (the bound
# torch.onnx uses too). Measured with ExecuTorch 1.5.1: a 2.27 GB embedded XNNPACK .pte still
# compiles, loads and runs on the host (the weights sit in named-data segments with 64-bit offsets,
# not in the flatbuffer), so this is a layout choice for paper-scale stages (program and weights
# shipped and updated apart), not a hard limit
EXTERNAL_WEIGHTS_BOUND = int(1.5 * 2**30)


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
    external_weights: str = field(default="auto", metadata={
        "doc": "weights in a <stage>.ptd beside the .pte (ExecuTorch program/data separation): always, "
               "never, or auto = when the stage's weights exceed 1.5 GiB",
        "choices": EXTERNAL_WEIGHTS})

    def __post_init__(self):
        require_at_least(self, "calibration_batches", 1)
