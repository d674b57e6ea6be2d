"""QuantPlan -> ONNX Runtime static QDQ quantization: which node is which plan layer, at what bits.

Matching. The TorchScript exporter loses most module scopes inside the DiT (``/q_3/MatMul``) and
renames transposed Linear weights (``onnx::MatMul_123``), so a layer is found first by value: the
stage module's weight (or its transpose, for Linear -> MatMul) equals the initializer's bytes.
Where the module is not at hand the exporter's node scope is used
(``/dit/sandwich/groups.0/high.0/attn/q/MatMul`` -> ``sandwich.groups.0.high.0.attn.q``). A plan
layer that maps to no node is an error (``PlanMatchError``), never a silent int8 default.

Translation. Each matched node gets its planned weight type (int8 / int4, symmetric per channel)
and, for static activations, its input tensor's type with the plan's calibrated range
(``rmin`` / ``rmax``), so ONNX Runtime calibrates only what the plan leaves open. Layers with
float activations are weight-only (``targets/onnx/qdq.py`` adds their DequantizeLinear).

Contracts: ``translate(plan, stage, model)`` -> ``Translation`` (CPU ``onnx`` target);
``apply_plan(plan, stage=Stage, model_path=Path) -> dict`` of keyword arguments for
``get_qnn_qdq_config`` (``onnx-qnn``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s2dit_deploy.errors import CompileCheckError

from .layer_names import layer_of, layer_pairs
from .layer_names import norm as _norm

log = logging.getLogger(__name__)

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}


class PlanMatchError(CompileCheckError):
    """A plan layer has no node in the exported ONNX graph, so its planned bits cannot be applied."""


@dataclass(frozen=True)
class LayerNode:
    """One ONNX node that computes (part of) a plan layer."""

    layer: str
    node: str
    op_type: str
    weight: str  # initializer name
    axis: int  # per-channel axis of the weight
    act_input: str | None  # the activation input tensor (None for Gather: its other input is an index)
    act_bits: int  # 0: float activations (weight-only)
    weight_bits: int
    act_range: tuple[float, float] | None


@dataclass(frozen=True)
class Translation:
    """What the QDQ model must look like for one stage."""

    stage: str
    nodes: tuple[LayerNode, ...]
    act_bits: int  # the stage's most common static activation bits
    overrides: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def quantized_nodes(self) -> list[str]:
        return sorted({n.node for n in self.nodes if n.act_bits})

    @property
    def weight_only(self) -> list[LayerNode]:
        return [n for n in self.nodes if not n.act_bits]

    def layer_map(self) -> dict[str, dict[str, Any]]:
        """layer -> planned bits and the node names carrying it (recorded in the artifact)."""
        out: dict[str, dict[str, Any]] = {}
        for n in self.nodes:
            e = out.setdefault(n.layer, {"weight_bits": n.weight_bits, "act_bits": n.act_bits, "nodes": []})
            e["nodes"].append(n.node)
        return out


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


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


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


def module_fingerprints(module, layers_by_norm: dict[str, str]) -> dict[str, str]:
    """digest of each plan layer's weight (and its transpose) -> plan layer."""
    import torch

    out: dict[str, str] = {}
    for path, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or not path:
            continue
        layer = layer_of(path, layers_by_norm)
        if layer is None:
            continue
        a = w.detach().float().cpu().numpy()
        for cand in (a, a.T) if a.ndim == 2 else (a,):
            out.setdefault(_digest(cand), layer)
    return out


def match_layers(model, layers: list[str], module=None) -> dict[str, list[tuple[Any, str, int]]]:
    """plan layer -> [(node, weight initializer, axis)]: by weight value, then by node scope."""
    from onnx import numpy_helper

    by_norm = {_norm(n): n for n in layers}
    prints = module_fingerprints(module, by_norm) if module is not None else {}
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, list[tuple[Any, str, int]]] = {}
    for node, weight, path, axis in weight_nodes(model):
        layer = prints.get(_digest(numpy_helper.to_array(inits[weight]))) if prints else None
        layer = layer or layer_of(path, by_norm)
        if layer is not None:
            found.setdefault(layer, []).append((node, weight, axis))
    missing = sorted(set(layers) - set(found))
    if missing:
        raise PlanMatchError(f"{len(missing)} of {len(layers)} plan layers match no ONNX node (by weight value "
                             f"or node scope): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                             "the plan does not fit this graph: recalibrate it for this model "
                             "(`s2dit-deploy calibrate`) or report the exporter's naming")
    return found


def translate(plan, stage: Any, model) -> Translation:
    """Every plan layer of ``stage`` as nodes with planned bits, plus ONNX Runtime tensor overrides."""
    from onnxruntime.quantization import QuantType

    stage_name = getattr(stage, "name", stage)
    pairs = layer_pairs(plan, stage_name, allow_float_act=True)
    found = match_layers(model, list(pairs), getattr(stage, "module", None))
    nodes = []
    for layer, hits in sorted(found.items()):
        a, w = pairs[layer]
        lq = plan.layer(stage_name, layer)
        for node, weight, axis in hits:
            act = None if node.op_type == "Gather" else node.input[0]
            nodes.append(LayerNode(layer, node.name, node.op_type, weight, axis, act, a if act else 0, w,
                                   lq.act_range if a else None))
    common = Counter(n.act_bits for n in nodes if n.act_bits).most_common(1)
    act_bits = common[0][0] if common else 8
    act_type = {8: QuantType.QUInt8, 16: QuantType.QUInt16}
    weight_type = {8: QuantType.QInt8, 4: QuantType.QInt4}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        if n.act_bits:
            overrides[n.weight] = [{"quant_type": weight_type[n.weight_bits], "symmetric": True, "axis": n.axis}]
    by_tensor: dict[str, list[LayerNode]] = {}
    for n in nodes:
        if n.act_bits:
            by_tensor.setdefault(n.act_input, []).append(n)
    no_range = []
    for tensor, users in by_tensor.items():
        bits = Counter(u.act_bits for u in users).most_common(1)[0][0]
        entry = {"quant_type": act_type[bits]}
        entry.update(_range([u for u in users if u.act_bits == bits]))
        if "rmin" not in entry:
            no_range.append(tensor)
        others = [u for u in users if u.act_bits != bits]
        if others:  # one tensor, consumers at two widths: a Q/DQ convert for the other ones
            conv = {"quant_type": act_type[others[0].act_bits], "recv_nodes": {u.node for u in others}}
            conv.update(_range(others))
            entry["convert"] = conv
        overrides[tensor] = [entry]
    if no_range:
        log.info("onnx %s: %d activation tensors have no planned range; ONNX Runtime calibrates them",
                 stage_name, len(no_range))
    log.info("onnx %s: plan %s -> %d nodes for %d layers, %d weight-only", stage_name, plan.name, len(nodes),
             len(found), sum(1 for n in nodes if not n.act_bits))
    return Translation(stage_name, tuple(nodes), act_bits, overrides)


def _range(users: list[LayerNode]) -> dict[str, Any]:
    """The union of the users' planned ranges (they observe the same tensor), widened to hold 0."""
    rngs = [u.act_range for u in users if u.act_range is not None]
    if not rngs:
        return {}
    lo, hi = min(r[0] for r in rngs), max(r[1] for r in rngs)
    return {"rmin": np.array(min(lo, 0.0), dtype=np.float32), "rmax": np.array(max(hi, 0.0), dtype=np.float32)}


def apply_plan(plan, stage: Any = None, model_path: str | Path | None = None) -> dict[str, Any]:
    """``get_qnn_qdq_config`` keyword arguments that quantize ``model_path`` as ``plan`` says (QNN EP:
    the whole graph is quantized at the stage default, plan layers get per-tensor overrides)."""
    import onnx

    return qnn_kwargs(translate(plan, stage, onnx.load(str(model_path))))


def qnn_kwargs(tr: Translation) -> dict[str, Any]:
    """A translation as ``get_qnn_qdq_config`` keyword arguments."""
    from onnxruntime.quantization import QuantType

    act_type = {8: QuantType.QUInt8, 16: QuantType.QUInt16}
    # QNN's get_qnn_qdq_config inserts its own type converts between 8- and 16-bit tensors
    overrides = {k: [{kk: vv for kk, vv in v[0].items() if kk != "convert"}] for k, v in tr.overrides.items()}
    excluded = [n.node for n in tr.weight_only]  # the QNN EP has no weight-only QDQ form: kept float
    return {"activation_type": act_type[tr.act_bits], "weight_type": QuantType.QInt8, "per_channel": True,
            "weight_symmetric": True, "init_overrides": overrides,
            **({"nodes_to_exclude": excluded} if excluded else {})}
