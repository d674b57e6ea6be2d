"""Quantization schemes (data), their storage cost, and which schemes each target can run.

A weight scheme says how one layer's weight is stored on device; an activation scheme how the
layer's input tensor is quantized at run time. Names are short strings so a plan stays readable:

- weights: ``fp16``; ``int8-pc`` / ``int4-pc`` (symmetric, one scale per output channel);
  ``int4-b32`` / ``int8-b32`` (symmetric, one scale per 32 input elements of a row: the
  ExecuTorch 8da4w layout); ``lut2`` / ``lut3`` / ``lut4`` / ``lut6`` (palettized: k-means
  look-up table per tensor, as ``coremltools.optimize.coreml.palettize_weights`` builds it).
  A ``-mse`` suffix on a linear scheme (``int4-pc-mse``) clips each channel's range to the
  value that minimizes the weight's quantization MSE instead of using min-max. A ``-gptq``
  suffix (``int4-pc-gptq``, Linear layers) keeps that MSE scale and rounds the weight with GPTQ
  (``gptq.py``): the rounded weight travels with the plan, already on the grid, so each target's
  own min-max quantizer reproduces it exactly.
- activations: ``float`` (fp16 on device), ``int8`` / ``int16`` (per-tensor, static range from
  calibration), ``int8-dyn`` (per-token dynamic int8, what 8da4w does at run time).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

FLOAT_BITS = 16  # weights left unquantized ship as fp16 on every target
SCALE_BITS = 16  # one fp16 scale per channel / block


@dataclass(frozen=True)
class WeightScheme:
    name: str
    kind: str  # "float" | "linear" | "lut"
    bits: int
    granularity: str = "tensor"  # "tensor" | "channel" | "block"
    block: int = 0
    range_method: str = "minmax"  # "minmax" | "mse" (linear schemes only)
    rounding: str = "nearest"  # "nearest" | "gptq" (per-channel linear schemes only)

    def nbytes(self, shape: tuple[int, ...]) -> float:
        """Bytes on device for a weight of ``shape`` (output channels first), metadata included."""
        n = math.prod(shape)
        if self.kind == "float":
            return n * FLOAT_BITS / 8
        if self.kind == "lut":
            return (n * self.bits + (1 << self.bits) * FLOAT_BITS) / 8
        if self.granularity == "channel":
            return (n * self.bits + shape[0] * SCALE_BITS) / 8
        if self.granularity == "block":
            return (n * self.bits + math.ceil(n / self.block) * SCALE_BITS) / 8
        return (n * self.bits + SCALE_BITS) / 8


_WEIGHT_RE = re.compile(r"^(?:(fp16)|int(\d+)-(pc|pt|b\d+)(-mse|-gptq)?|lut(\d))$")


def weight_scheme(name: str) -> WeightScheme:
    """Parse a weight scheme name (see the module docstring)."""
    m = _WEIGHT_RE.match(name)
    if not m:
        raise ValueError(f"unknown weight scheme {name!r}; e.g. fp16, int8-pc, int4-pc, int4-b32, lut4, "
                         "int4-pc-mse, int4-pc-gptq")
    if m.group(1):
        return WeightScheme(name, "float", FLOAT_BITS)
    if m.group(5):
        bits = int(m.group(5))
        if bits not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"{name!r}: palettization supports 1, 2, 3, 4, 6, 8 bits")
        return WeightScheme(name, "lut", bits)
    bits, gran, suffix = int(m.group(2)), m.group(3), m.group(4)
    if bits not in (4, 8):
        raise ValueError(f"{name!r}: linear weight quantization supports 4 and 8 bits")
    method = "mse" if suffix else "minmax"
    if suffix == "-gptq":
        if gran != "pc":
            raise ValueError(f"{name!r}: GPTQ rounding is offered per channel only (int4-pc-gptq, int8-pc-gptq)")
        return WeightScheme(name, "linear", bits, "channel", range_method="mse", rounding="gptq")
    if gran == "pc":
        return WeightScheme(name, "linear", bits, "channel", range_method=method)
    if gran == "pt":
        return WeightScheme(name, "linear", bits, "tensor", range_method=method)
    return WeightScheme(name, "linear", bits, "block", int(gran[1:]), method)


def fits(name: str, shape: tuple[int, ...], kind: str = "Linear") -> bool:
    """Whether a weight of ``shape`` (output channels first) of a ``kind`` layer (``Linear``,
    ``Conv2d``, ...) can be stored with scheme ``name``: per-block schemes need the input size to be
    a multiple of the block; GPTQ rounding is implemented for Linear layers only."""
    ws = weight_scheme(name)
    if ws.rounding == "gptq" and kind != "Linear":
        return False
    return ws.granularity != "block" or math.prod(shape[1:]) % ws.block == 0


@dataclass(frozen=True)
class ActScheme:
    name: str
    bits: int  # 0 = float
    dynamic: bool = False

    @property
    def is_float(self) -> bool:
        return self.bits == 0


ACT_SCHEMES = {
    "float": ActScheme("float", 0),
    "int8": ActScheme("int8", 8),
    "int16": ActScheme("int16", 16),
    "int8-dyn": ActScheme("int8-dyn", 8, dynamic=True),
}


def act_scheme(name: str) -> ActScheme:
    if name not in ACT_SCHEMES:
        raise ValueError(f"unknown activation scheme {name!r}; one of {', '.join(ACT_SCHEMES)}")
    return ACT_SCHEMES[name]


@dataclass(frozen=True)
class TargetSchemes:
    """What a target's runtime can execute; the allocator never leaves this set."""

    target: str
    weights: tuple[str, ...]
    acts: tuple[str, ...]
    note: str = ""
    quantized_kinds: tuple[str, ...] | None = None  # layer kinds the translation quantizes (None: all)

    def legal_weight(self, name: str) -> bool:
        return name in self.weights

    def legal_act(self, name: str) -> bool:
        return name in self.acts


# The calibration workflow's default measured / estimated schemes (``workflow.CalibrationSettings``);
# here because the CLI parser shows them and must not import torch to do so.
DEFAULT_MEASURE = ("int4-pc", "int4-pc-gptq", "int8-pc-gptq")
DEFAULT_ESTIMATE = ("int8-pc", "int4-pc-mse", "int4-b32", "lut6", "lut4", "lut3", "lut2")

_LINEAR_PC = ("int8-pc", "int4-pc", "int8-pc-mse", "int4-pc-mse", "int8-pc-gptq", "int4-pc-gptq")
_LUTS = ("lut2", "lut3", "lut4", "lut6")

TARGET_SCHEMES: dict[str, TargetSchemes] = {
    t.target: t
    for t in (
        # Neural Engine: per-channel (or per-tensor) int8/int4 or palettization; per-block linear
        # quantization is rejected by the ANE compiler (TOOLCHAINS.md). Activations: fp16 or int8.
        TargetSchemes("coreml", ("fp16", *_LINEAR_PC, *_LUTS), ("float", "int8"),
                      "ANE: per-channel int8/int4 or LUT, never per-block"),
        # Core AI (coreai-opt, Core AI finalize): the Neural Engine's per-channel int8/int4 and LUTs as for
        # Core ML, static int8 activations (its export takes no 16-bit or dynamic activation quantization).
        TargetSchemes("coreai", ("fp16", *_LINEAR_PC, *_LUTS), ("float", "int8"),
                      "coreai-opt: per-channel int8/int4 or LUT weights, static int8 activations"),
        # XNNPACK: PT2E int8 per-channel (static int8 activations) and torchao 8da4w (int4 group 32,
        # dynamic per-token int8 activations). No -gptq: torchao's int8 per-axis grid is [-128, 127]
        # with scale max/127.5, which a GPTQ-rounded weight on our [-127, 127] grid does not survive.
        TargetSchemes("executorch-xnnpack", ("fp16", "int8-pc", "int8-pc-mse", "int4-b32"),
                      ("float", "int8", "int8-dyn"), "int8 per-channel or 8da4w (int4, group 32)",
                      quantized_kinds=("Linear",)),  # the torchao per-layer flow quantizes Linear only
        # Hexagon HTP: 8a8w, 16a4w, 8a4w (per-channel weights).
        TargetSchemes("executorch-qnn", _LINEAR_PC,
                      ("int8", "int16"), "QNN HTP: 8a8w, 16a4w, 8a4w"),
        TargetSchemes("onnx", ("fp16", *_LINEAR_PC),
                      ("float", "int8", "int16"), "ONNX QDQ (int4 weights need opset 21)"),
        TargetSchemes("onnx-qnn", _LINEAR_PC,
                      ("int8", "int16"), "ONNX QDQ on the QNN EP (HTP)"),
        # Host simulation only: everything, for experiments.
        TargetSchemes("fake", ("fp16", *_LINEAR_PC, "int4-b32", "int8-b32", "int4-b32-mse", *_LUTS),
                      tuple(ACT_SCHEMES)),
    )
}


def target_schemes(target: str | None) -> TargetSchemes:
    key = target or "fake"
    if key not in TARGET_SCHEMES:
        raise KeyError(f"no quantization schemes declared for target {key!r}; "
                       f"known: {', '.join(TARGET_SCHEMES)}")
    return TARGET_SCHEMES[key]
