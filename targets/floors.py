"""Default PSNR floors per target, precision and quantization, and the planned-vs-built bit check.

``validate`` applies these when no ``--floor`` is given, so a bundle swapped for other weights
(9 dB measured) fails. Each floor sits a margin below what the project measured on the trained
s2dit-small at 64x32 (closing notes of issues 4/5, `issues stops`):

- fp32 ONNX / XNNPACK: DiT step 89.5 dB, decoded stream 74.3 dB          -> 60 (stream 60)
- Core ML fp16 (reference executor), QNN fp16: step 62.2, stream 60.3    -> 50 (stream 50)
- w8a8 plans: Core ML 44.7 / 45.4, XNNPACK 50.9 / 56.0                   -> 35 (stream 35)
- QNN 8/16-bit (PT2E 8a8w, min-max observer): 30.4 / 30.8; moving avg 29.2 -> 25 (stream 25)
- 4-bit plans: XNNPACK 8da4w 33.0 / 37.2, Core ML w4a8-mixed 37.5 / 27.9,
  Core ML w4a8-uniform 24.2 / 16.6                                       -> 20 (stream 15)
- static int8 XNNPACK (``xnnpack_quant=int8``): step 18.1, stream 17.8   -> 15 (stream 15)
"""

from __future__ import annotations

import re
from typing import Any

# kind -> (per-output floor "*", stream floor), dB
FLOORS: dict[str, tuple[float, float]] = {
    "fp32": (60.0, 60.0),
    "fp16": (50.0, 50.0),
    "w8a8": (35.0, 35.0),
    "qnn-8bit": (25.0, 25.0),
    "4bit": (20.0, 15.0),
    "static-int8": (15.0, 15.0),
}


def quant_name(artifact: Any) -> str | None:
    """The quantization an artifact records (plan name, preset or scheme); None when float."""
    q = artifact.quant or {}
    for key in ("plan", "preset", "scheme"):
        v = q.get(key)
        if isinstance(v, dict):
            v = v.get("name")
        if v and str(v) not in ("none", "float", "fp16", "fp32") and not str(v).startswith("float model"):
            return str(v)
    return None


def floor_kind(target: str, artifact: Any) -> str:
    q = quant_name(artifact)
    if q is None:
        precision = (artifact.metadata or {}).get("compute_precision") or (artifact.metadata or {}).get("precision")
        if target in ("coreml", "coreai", "executorch-qnn", "onnx-qnn"):
            return "fp32" if precision == "fp32" else "fp16"
        return "fp32"
    if re.search(r"(^|[^0-9])4(w|a|$)|w4|da4w", q):
        return "4bit"
    if q == "int8":
        return "static-int8"
    if target in ("executorch-qnn", "onnx-qnn"):  # static 8/16-bit activations on HTP (30.4 dB measured)
        return "qnn-8bit"
    return "w8a8"


def default_floors(target: str, artifact: Any) -> dict[str, float]:
    """``{"*": dB, "stream": dB}`` for one artifact (keys may also name single outputs)."""
    each, stream = FLOORS[floor_kind(target, artifact)]
    return {"*": each, "stream": stream}


def check_plan_records(artifact: Any, plan: Any) -> list[str]:
    """Planned weight scheme per layer vs the ``quant["layer_weights"]`` record the target wrote."""
    if plan is None or not hasattr(plan, "stages"):
        return []
    planned = plan.stages.get(artifact.stage, {})
    if not planned:
        return []
    built = (artifact.quant or {}).get("layer_weights")
    if not isinstance(built, dict):
        return []  # this artifact records no per-layer schemes: nothing to compare (see the report)
    out = []
    for layer, lq in sorted(planned.items()):
        got = built.get(layer)
        if got is None:
            out.append(f"{artifact.stage}:{layer}: planned {lq.weight}, no matching layer in the artifact")
        elif got != lq.weight:
            out.append(f"{artifact.stage}:{layer}: planned {lq.weight}, built {got}")
    return out


def unmatched_plan_layers(artifact: Any, plan: Any) -> list[str]:
    """Quantized plan layers the target's translation matched to nothing (``quant["unmatched_layers"]``).

    Core ML and XNNPACK record which plan layers found no weight in the graph; such a layer keeps
    float weights while the manifest names the plan, so it is a mismatch.
    """
    if plan is None or not hasattr(plan, "stages"):
        return []
    planned = plan.stages.get(artifact.stage, {})
    out = []
    for layer in (artifact.quant or {}).get("unmatched_layers") or []:
        lq = planned.get(layer)
        if lq is not None and lq.weight != "fp16":
            out.append(f"{artifact.stage}:{layer}: planned {lq.weight}, no matching weight in the artifact")
    return out + check_plan_records(artifact, plan)
