"""Static QDQ quantization of an exported stage with ONNX Runtime, calibrated on recorded inputs.

Shared by ``onnx`` (QDQ model on the CPU EP) and ``onnx-qnn`` (QDQ model compiled for HTP). A
QuantPlan is translated by ``s2dit_deploy.quant.onnx``; without one, ``precision`` picks uint8
(``8a8w``) or uint16 (``16a8w``) activations with int8 per-channel weights.

On the CPU EP (``plan_layers_only``) only the plan's layers and the activations feeding them are
quantized: a whole-graph QDQ pass also quantizes non-compute tensors (Resize scales, shape and
index inputs), which breaks the model at run time. Float-activation layers become weight-only
(an int8 / int4 initializer with a per-channel DequantizeLinear). The layer -> node map is stored
in the model's metadata so ``plan_mismatches`` can check the built bits against the plan.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from s2dit_deploy.stages import Stage

log = logging.getLogger(__name__)

LAYER_MAP_KEY = "s2dit.quant_layers"
_LAYER_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}  # op -> weight input
_BITS = {2: 8, 3: 8, 4: 16, 5: 16, 21: 4, 22: 4}  # TensorProto UINT8, INT8, UINT16, INT16, UINT4, INT4


class _Reader:
    """A CalibrationDataReader over named numpy inputs."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed by MinMax; present for the protocol
        pass


def layer_norm_overrides(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """LayerNorm scales as asymmetric uint8 per tensor: HTP's LayerNorm validation (error 3110)
    rejects the signed symmetric int8 the other weights use."""
    import onnx
    from onnxruntime.quantization import QuantType

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {n.input[1]: [{"quant_type": QuantType.QUInt8, "symmetric": False}]
            for n in model.graph.node if n.op_type == "LayerNormalization" and len(n.input) > 1
            and n.input[1] in inits}


def add_weight_only(model, nodes) -> None:
    """Replace each node's float weight by a symmetric per-channel int8/int4 one + DequantizeLinear."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, str] = {}
    for n in nodes:
        if n.weight not in done:
            w = numpy_helper.to_array(inits[n.weight]).astype(np.float32)
            qmax = 2 ** (n.weight_bits - 1) - 1
            red = tuple(i for i in range(w.ndim) if i != n.axis)
            scale = np.abs(w).max(axis=red) / qmax if red else np.abs(w) / qmax
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            shape = [1] * w.ndim
            shape[n.axis] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -qmax - 1, qmax).astype(np.int8)
            dtype = TensorProto.INT8 if n.weight_bits == 8 else TensorProto.INT4
            qn, sn, zn, out = (f"{n.weight}_wq", f"{n.weight}_wscale", f"{n.weight}_wzp", f"{n.weight}_wdq")
            model.graph.initializer.extend([
                helper.make_tensor(qn, dtype, q.shape, q.ravel().tolist()),
                numpy_helper.from_array(scale, sn),
                helper.make_tensor(zn, dtype, scale.shape, [0] * scale.size)])
            model.graph.node.insert(0, helper.make_node("DequantizeLinear", [qn, sn, zn], [out],
                                                        name=f"{n.weight}_DequantizeLinear", axis=n.axis))
            model.graph.initializer.remove(inits[n.weight])
            done[n.weight] = out
            if n.weight_bits == 4:
                _need_opset(model, 21)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            node.input[:] = [done.get(i, i) for i in node.input]


def keep_float_outside_plan(model, planned: set[str]) -> int:
    """Give every non-plan node its float input back where ONNX Runtime handed it the dequantized
    copy of an activation a plan layer shares; drops Q/DQ nodes left unused. Returns rewired inputs."""
    prod = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.name in planned or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            src = name
            while (dq := prod.get(src)) is not None and dq.op_type == "DequantizeLinear" \
                    and (q := prod.get(dq.input[0])) is not None and q.op_type == "QuantizeLinear":
                src = q.input[0]
            if src != name:
                node.input[k] = src
                rewired += 1
    outputs = {o.name for o in model.graph.output}
    while True:  # drop Q/DQ chains nobody reads any more
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return rewired
        for n in dead:
            model.graph.node.remove(n)


def _need_opset(model, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < version:
            op.version = version
    model.ir_version = max(model.ir_version, 10)


def _plan_qdq(float_model: Path, out: Path, reader, plan: Any, stage: Stage) -> dict[str, Any]:
    """CPU EP: quantize exactly the plan's layers; returns the summary's per-layer part."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from s2dit_deploy.quant import onnx as quant_onnx

    tr = quant_onnx.translate(plan, stage, onnx.load(str(float_model)))
    staged = out.with_name(out.stem + ".wo.onnx")
    model = onnx.load(str(float_model))
    add_weight_only(model, tr.weight_only)
    onnx.save(model, str(staged))
    act = QuantType.QUInt16 if tr.act_bits == 16 else QuantType.QUInt8
    if tr.quantized_nodes:
        quantize_static(str(staged), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=act,
                        weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=tr.quantized_nodes,
                        extra_options={"TensorQuantOverrides": tr.overrides, "WeightSymmetric": True,
                                       "ActivationSymmetric": False,
                                       # a layer's output is the next op's float input, not a plan tensor
                                       "OpTypesToExcludeOutputQuantization": sorted(_LAYER_OPS)})
        staged.unlink()
        model = onnx.load(str(out))
        if keep_float_outside_plan(model, {n.node for n in tr.nodes}):
            onnx.save(model, str(out))
    else:
        staged.replace(out)
    return {"activation_type": str(act), "layers": _record_layers(out, tr),
            "quantized_nodes": len(tr.quantized_nodes), "weight_only_nodes": len(tr.weight_only),
            "planned_ranges": sum(1 for n in tr.nodes if n.act_range is not None)}


def _record_layers(out: Path, tr) -> dict[str, dict[str, int]]:
    """Store the layer -> node map in the model (for ``plan_mismatches``); returns per-layer bits."""
    import onnx

    model = onnx.load(str(out))
    layers = tr.layer_map()
    model.metadata_props.add(key=LAYER_MAP_KEY, value=json.dumps({"stage": tr.stage, "layers": layers}))
    onnx.save(model, str(out))
    return {k: {"weight_bits": v["weight_bits"], "act_bits": v["act_bits"]} for k, v in layers.items()}


def quantize_qdq(float_model: Path, out: Path, samples: list[dict[str, np.ndarray]], precision: str,
                 plan: Any = None, stage: Stage | None = None, plan_layers_only: bool = False) -> dict[str, Any]:
    """Static QDQ quantization; returns the summary. ``plan_layers_only`` (CPU EP, needs ``plan``)
    quantizes only the plan's layers; otherwise the whole graph (QNN EP conventions)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(samples)
    base = {"precision": precision, "calibration_samples": len(samples),
            "plan": getattr(plan, "name", None) if plan is not None else None}
    if plan_layers_only:
        if plan is None:
            raise ValueError("plan_layers_only needs a QuantPlan")
        return {**base, "scheme": "onnxruntime QDQ (plan layers only)", "weight_type": "per layer",
                "per_channel": True, **_plan_qdq(Path(float_model), Path(out), reader, plan, stage)}
    overrides: dict[str, Any] = {}
    tr = None
    if plan is not None:
        import onnx

        from s2dit_deploy.quant import onnx as quant_onnx

        tr = quant_onnx.translate(plan, stage, onnx.load(str(float_model)))
        overrides = quant_onnx.qnn_kwargs(tr)
    act = QuantType.QUInt16 if precision == "16a8w" else QuantType.QUInt8
    kwargs = {"activation_type": act, "weight_type": QuantType.QInt8, "per_channel": True,
              "weight_symmetric": True, **overrides}
    kwargs["init_overrides"] = {**layer_norm_overrides(float_model), **(kwargs.get("init_overrides") or {})}
    config = get_qnn_qdq_config(str(float_model), reader, **kwargs)
    quantize(str(float_model), str(out), config)
    layers = _record_layers(Path(out), tr) if tr is not None else {}
    return {**base, **({"layers": layers} if layers else {}), "scheme": "onnxruntime QDQ (get_qnn_qdq_config)",
            "activation_type": str(kwargs["activation_type"]), "weight_type": str(kwargs["weight_type"]),
            "per_channel": bool(kwargs["per_channel"]),
            "overridden_tensors": len(kwargs.get("init_overrides") or {}),
            "float_nodes": len(kwargs.get("nodes_to_exclude") or [])}


def _qdq_bits(tensor: str, producers: dict[str, Any], inits: dict[str, Any]) -> int:
    """Bits of the quantized tensor a DequantizeLinear turns into ``tensor``; 0 when it is float."""
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return 0
    src = inits.get(dq.input[0])
    if src is not None:
        return _BITS.get(src.data_type, 0)
    if len(dq.input) > 2 and dq.input[2] in inits:
        return _BITS.get(inits[dq.input[2]].data_type, 0)
    q = producers.get(dq.input[0])
    for a in (q.attribute if q is not None else []):
        if a.name == "output_dtype" and a.i:
            return _BITS.get(a.i, 0)
    return 8  # QuantizeLinear without zero point or output_dtype: uint8


def plan_mismatches(onnx_path: str | Path, plan: Any, stage: Any) -> list[str]:
    """Each plan layer of ``stage`` whose node in the built QDQ model carries other weight or
    activation bits than planned (or that has no node), as a readable line; [] when all match."""
    import onnx

    stage_name = getattr(stage, "name", stage)
    model = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in model.metadata_props}
    if LAYER_MAP_KEY not in meta:
        return [f"{Path(onnx_path).name}: no layer map ({LAYER_MAP_KEY}); not built from a plan by this target"]
    recorded = json.loads(meta[LAYER_MAP_KEY])["layers"]
    from s2dit_deploy.quant.layer_names import layer_pairs

    pairs = layer_pairs(plan, stage_name, allow_float_act=True)
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for layer, (act_bits, weight_bits) in sorted(pairs.items()):
        names = (recorded.get(layer) or {}).get("nodes") or []
        if not names:
            out.append(f"{stage_name}:{layer}: no ONNX node carries this layer")
            continue
        for name in names:
            node = nodes.get(name)
            if node is None:
                out.append(f"{stage_name}:{layer}: node {name} is not in the model")
                continue
            wi = _LAYER_OPS.get(node.op_type, 1)
            got_w = _qdq_bits(node.input[wi], producers, inits)
            if got_w != weight_bits:
                out.append(f"{stage_name}:{layer}: node {name} has {got_w or 'float'}-bit weights, "
                           f"the plan says {weight_bits}")
            if node.op_type != "Gather":
                got_a = _qdq_bits(node.input[0], producers, inits)
                if got_a != act_bits:
                    out.append(f"{stage_name}:{layer}: node {name} has {got_a or 'float'}-bit activations, "
                               f"the plan says {act_bits or 'float'}")
    return out
