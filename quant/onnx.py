"""QuantPlan -> ONNX Runtime static QDQ quantization (``get_qnn_qdq_config`` keyword arguments).

ONNX Runtime quantizes per tensor: the stage-wide defaults are the plan's most common activation
bits (uint8 / uint16) with int8 symmetric per-channel weights, and every layer that differs gets a
tensor override (``init_overrides``): int4 weights (``QInt4``, opset 21, which ONNX Runtime
upgrades the model to) or 8-bit weights where the default is 4-bit, and a 16-bit / 8-bit type
on the layer's input activation. ``get_qnn_qdq_config`` then inserts the type converts QNN needs
between 8- and 16-bit tensors.

Layers are found by the module scope the exporter writes into node names
(``/dit/sandwich/groups.0/high.0/attn/q/MatMul`` -> ``sandwich.groups.0.high.0.attn.q``), since
the TorchScript exporter renames transposed Linear weights (``onnx::MatMul_123``).

Contract (``targets/onnx/qnn_target.py``): ``apply_plan(plan, stage=Stage, model_path=Path) ->
dict`` of keyword arguments for ``get_qnn_qdq_config``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from .qnn import _norm, layer_of, layer_pairs

log = logging.getLogger(__name__)

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


def scope_path(node_name: str) -> str:
    """``/dit/sandwich/groups.0/attn/q/MatMul`` -> ``dit.sandwich.groups.0.attn.q``."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def channel_axis(op_type: str, attrs: dict[str, Any], rank: int) -> int:
    """Output-channel axis of a weight initializer as ONNX Runtime's per-channel quantizer uses it."""
    if op_type == "MatMul":
        return rank - 1  # (in, out)
    if op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    if op_type == "ConvTranspose":
        return 1
    return 0


def weight_nodes(model) -> list[tuple[Any, str, str, int]]:
    """(node, weight initializer name, module path, channel axis) of every weight-carrying node."""
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        idx = _WEIGHT_INPUT.get(node.op_type)
        if idx is None or len(node.input) <= idx or node.input[idx] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = channel_axis(node.op_type, attrs, len(inits[node.input[idx]].dims))
        out.append((node, node.input[idx], scope_path(node.name), axis))
    return out


def apply_plan(plan, stage: Any = None, model_path: str | Path | None = None) -> dict[str, Any]:
    """``get_qnn_qdq_config`` keyword arguments that quantize ``model_path`` as ``plan`` says."""
    import onnx
    from onnxruntime.quantization import QuantType

    stage_name = getattr(stage, "name", stage)
    pairs = layer_pairs(plan, stage_name, allow_float_act=True)
    act_default = Counter(a for a, _ in pairs.values() if a).most_common(1)
    act_bits = act_default[0][0] if act_default else 8
    act_type = {8: QuantType.QUInt8, 16: QuantType.QUInt16}
    weight_type = {8: QuantType.QInt8, 4: QuantType.QInt4}
    model = onnx.load(str(model_path), load_external_data=False)
    by_norm = {_norm(n): n for n in pairs}
    overrides: dict[str, list[dict[str, Any]]] = {}
    matched: set[str] = set()
    counts: Counter = Counter()
    excluded: list[str] = []
    for node, weight, path, axis in weight_nodes(model):
        layer = layer_of(path, by_norm)
        if layer is None:
            continue
        matched.add(layer)
        a, w = pairs[layer]
        if not a:  # float activations: ONNX QDQ has no weight-only form for the QNN EP; keep it float
            excluded.append(node.name)
            continue
        counts[f"{a}a{w}w"] += 1
        if w != 8:
            overrides[weight] = [{"quant_type": weight_type[w], "symmetric": True, "axis": axis}]
        if a != act_bits and node.input[0] not in overrides:
            overrides[node.input[0]] = [{"quant_type": act_type[a]}]
    missing = sorted(set(pairs) - matched)
    if missing:
        log.warning("onnx %s: %d plan layers have no ONNX weight node (kept at the defaults): %s",
                    stage_name, len(missing), missing[:4])
    log.info("onnx %s: plan %s -> default %da8w, per-node %s", stage_name, plan.name, act_bits, dict(counts))
    return {"activation_type": act_type[act_bits], "weight_type": QuantType.QInt8, "per_channel": True,
            "weight_symmetric": True, "init_overrides": overrides,
            **({"nodes_to_exclude": excluded} if excluded else {})}
