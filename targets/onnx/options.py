"""Options of the ``onnx`` and ``onnx-qnn`` targets, as plain data (no onnx / onnxruntime import)."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2dit_deploy.targets.option_checks import canonical_soc, require_at_least

EXPORTERS = ("torchscript", "dynamo")
# --quant names onnx-qnn resolves itself; without --quant it builds DEFAULT_QUANT (a float graph
# is not what HTP runs through the QNN EP's QDQ path)
QUANT_PRESETS = ("8a8w", "16a8w")
DEFAULT_QUANT = "8a8w"
EXTERNAL_WEIGHTS = ("auto", "always", "never")
# ``external_weights=auto`` writes weights as external data above this many bytes (what torch.onnx
# itself uses): an ONNX model is one protobuf, which cannot exceed 2 GiB
EXTERNAL_WEIGHTS_BOUND = 1536 * 2**20
_EXTERNAL_DOC = ("weights as ONNX external data in <model>.onnx.data beside the model: always, never, or "
                 "auto = when the stage's weights exceed 1.5 GiB (a protobuf stops at 2 GiB)")


@dataclass(frozen=True)
class OnnxOptions:
    """What ``OnnxTarget.compile`` takes (fp32 model on the CPU EP; ``--quant`` makes it QDQ)."""

    precision: str = field(default="fp32", metadata={
        "doc": "compute precision of the float model (ONNX Runtime CPU runs fp32)", "choices": ("fp32",)})
    onnx_exporter: str = field(default="torchscript", metadata={
        "doc": "torch.onnx exporter (torchscript gives the cleanest static graphs)", "choices": EXPORTERS})
    calibration_samples: int = field(default=0, metadata={
        "doc": "cap on recorded calibration calls per stage when quantizing (0 = all)"})
    external_weights: str = field(default="auto", metadata={"doc": _EXTERNAL_DOC, "choices": EXTERNAL_WEIGHTS})

    def __post_init__(self):
        require_at_least(self, "calibration_samples", 0)


@dataclass(frozen=True)
class OnnxQnnOptions:
    """What ``OnnxQnnTarget.compile`` takes; quantization from ``--quant`` (default 8a8w)."""

    QUANT_PRESETS = QUANT_PRESETS

    soc: str = field(default="SM8750", metadata={
        "doc": "Snapdragon SoC to build the QNN context binary for (SM8550, SM8650, SM8750, SM8850)"})
    precision: str = field(default="fp16", metadata={
        "doc": "compute precision of ops HTP runs in float", "choices": ("fp16",),
        "hint": "quantization comes from --quant (8a8w, 16a8w or a plan)"})
    onnx_exporter: str = field(default="torchscript", metadata={
        "doc": "torch.onnx exporter", "choices": EXPORTERS})
    calibration_samples: int = field(default=0, metadata={
        "doc": "cap on recorded calibration calls per stage (0 = all)"})
    external_weights: str = field(default="auto", metadata={
        "doc": _EXTERNAL_DOC + "; applies to the portable .qdq.onnx, and with external weights the "
               ".ctx.onnx keeps its QNN context binary in a .bin beside it (EPContext embed_mode=0)",
        "choices": EXTERNAL_WEIGHTS})

    def __post_init__(self):
        canonical_soc(self)
        require_at_least(self, "calibration_samples", 0)
