"""QuantPlan -> Core ML: per-op weight compression plus int8 activation quantize/dequantize.

``apply_plan(mlmodel, plan, stage_name)`` returns ``(mlmodel, summary)``:
1. one MIL graph pass (ours) that, for every conv / linear op whose weight const belongs to a plan
   layer, (a) clips ``-mse`` weights to their MSE-optimal per-channel range, so Core ML's own
   min-max scale equals ours, and (b) inserts ``quantize`` -> ``dequantize`` (int8, per tensor,
   our calibrated scale and zero point) on the op's input: coremltools' activation calibration
   calls ``predict`` and so needs macOS, this does not;
2. ``coremltools.optimize.coreml.linear_quantize_weights`` with per-op ``OpLinearQuantizerConfig``
   (``linear_symmetric``, per-channel; the plan's legality check already refused per-block for
   the Neural Engine) and ``palettize_weights`` with per-op ``OpPalettizerConfig`` (k-means).

Plan layer names are matched to weight consts by name: ``torch.export`` names a parameter
``p_<path with dots as underscores>_...``; the longest plan layer whose underscored name occurs in
the const name at an ``_`` boundary wins (ANE rewrites that split or reshape a layer keep its path
as a prefix). Unmatched plan layers (e.g. folded away by a rewrite) are listed in the summary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .layer_names import match_layer
from .layer_names import norm as _norm
from .observers import act_qparams
from .schemes import weight_scheme

log = logging.getLogger(__name__)

WEIGHT_CONSUMERS = {"conv": "weight", "linear": "weight", "matmul": "y", "gather": "x", "conv_transpose": "weight"}
INPUT_OF = {"conv": "x", "linear": "x", "matmul": "x", "conv_transpose": "x"}


def weight_ops(prog) -> list[tuple[Any, str, Any]]:
    """(consumer op, weight-input name, const op) for every const-weight conv / linear / matmul."""
    out = []
    for func in prog.functions.values():
        for op in list(func.operations):
            key = WEIGHT_CONSUMERS.get(op.op_type)
            if key is None or key not in op.inputs:
                continue
            src = op.inputs[key].op
            if src is not None and src.op_type == "const":
                out.append((op, key, src))
    return out


def _make_pass(stage_layers: Mapping[str, Any], names: dict[str, str], summary: dict[str, Any]):
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class InsertActQuantAndClip(AbstractGraphPass):
        def apply(self, prog):
            import torch

            from .observers import weight_scale

            qdq: dict[tuple, Any] = {}
            for op, _key, const in weight_ops(prog):
                layer = names.get(const.name)
                if layer is None:
                    continue
                lq = stage_layers[layer]
                ws = weight_scheme(lq.weight)
                if ws.kind == "linear" and ws.rounding == "nearest" and ws.range_method == "mse" and const.name not in summary["clipped"]:
                    val = np.asarray(const.val.val)
                    w = torch.from_numpy(val.astype(np.float32))
                    clip = (weight_scale(w, ws) * ((1 << (ws.bits - 1)) - 1)).numpy()
                    clipped = np.clip(val.astype(np.float32), -clip, clip).astype(val.dtype)
                    with op.enclosing_block:
                        new = mb.const(val=clipped, name=const.name + "_mseclip", before_op=const)
                    op.enclosing_block.replace_uses_of_var_after_op(anchor_op=new.op, old_var=const.outputs[0],
                                                                    new_var=new)
                    summary["clipped"].append(const.name)
                    names[new.op.name] = layer
                if lq.act != "int8" or lq.act_range is None or op.op_type not in INPUT_OF:
                    continue
                x = op.inputs[INPUT_OF[op.op_type]]
                scale, zp, _, _ = act_qparams(lq.act_range[0], lq.act_range[1], 8)
                dt = np.float16 if x.dtype.__name__ == "fp16" else np.float32
                key = (x.name, round(scale, 12), zp)
                if key not in qdq:
                    with op.enclosing_block:
                        q = mb.quantize(input=x, scale=dt(scale), zero_point=np.int8(zp), output_dtype="int8",
                                        before_op=op, name=f"{_norm(x.name)}_aq")
                        qdq[key] = mb.dequantize(input=q, scale=dt(scale), zero_point=np.int8(zp),
                                                 before_op=op, name=f"{_norm(x.name)}_adq")
                op.set_inputs(**{INPUT_OF[op.op_type]: qdq[key]})
                summary["act_quantized"].append(op.name)
            summary["qdq_pairs"] = len(qdq)

    return InsertActQuantAndClip()


def folded_tables(prog, tables: Mapping[str, np.ndarray], taken: set[str]) -> dict[str, str]:
    """{const name: plan layer} for constants that are row slices of an embedding table (found by value)."""
    out = {}
    for func in prog.functions.values():
        for op in func.operations:
            if op.op_type != "const" or op.name in taken or op.outputs[0].val is None:
                continue
            val = np.asarray(op.outputs[0].val)
            if val.dtype.kind != "f" or val.ndim < 2:
                continue
            for layer, table in tables.items():
                d = table.shape[1]
                if val.shape[-1] != d or val.size // d > table.shape[0]:
                    continue
                rows = val.reshape(-1, d).astype(np.float32)
                ref = table[: rows.shape[0]]
                if np.allclose(rows, ref, rtol=0, atol=1e-3 * max(float(np.abs(ref).max()), 1e-6)):
                    out[op.name] = layer
    return out


def apply_plan(mlmodel, plan, stage_name: str, embedding_tables: Mapping[str, np.ndarray] | None = None):
    """Compress ``mlmodel``'s weights and quantize its activations as ``plan`` says for ``stage_name``;
    ``embedding_tables`` ({layer: weight}) lets a folded constant-index lookup be found by value."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.models.utils import _apply_graph_pass

    plan.check_target("coreml")
    stage_layers = dict(plan.stages.get(stage_name, {}))
    summary: dict[str, Any] = {"plan": plan.name, "stage": stage_name, "clipped": [], "act_quantized": [],
                               "weights": {}, "unmatched_layers": []}
    if not stage_layers:
        return mlmodel, summary
    prog = mlmodel._mil_program
    if prog is None:
        raise ValueError("apply_plan needs an ML program (mlprogram) model")
    layer_names = list(stage_layers)
    names: dict[str, str] = {}
    for _op, _key, const in weight_ops(prog):
        layer = match_layer(const.name, layer_names)
        if layer is not None:
            names[const.name] = layer
    unmatched = set(layer_names) - set(names.values())
    if unmatched and embedding_tables:
        folded = folded_tables(prog, {k: v for k, v in embedding_tables.items() if k in unmatched}, set(names))
        names.update(folded)
        summary["folded_embeddings"] = sorted(set(folded.values()))
    summary["unmatched_layers"] = sorted(set(layer_names) - set(names.values()))
    if summary["unmatched_layers"]:
        log.warning("coreml %s: %d plan layers have no weight in the program (e.g. %s)", stage_name,
                    len(summary["unmatched_layers"]), summary["unmatched_layers"][:3])
    spec_version = max(mlmodel.get_spec().specificationVersion, ct.target.iOS18)
    mlmodel = _apply_graph_pass(mlmodel, _make_pass(stage_layers, names, summary), spec_version=spec_version,
                                skip_model_load=True)
    lin, pal = {}, {}
    for const_name, layer in names.items():
        ws = weight_scheme(stage_layers[layer].weight)
        if ws.kind == "linear":
            lin[const_name] = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{ws.bits}",
                                                          granularity="per_channel" if ws.granularity == "channel"
                                                          else "per_tensor", weight_threshold=0)
        elif ws.kind == "lut":
            pal[const_name] = cto.OpPalettizerConfig(nbits=ws.bits, mode="kmeans", granularity="per_tensor",
                                                     weight_threshold=0)
        summary["weights"][const_name] = ws.name
    # consts replaced by the clip pass carry the "_mseclip" name
    lin = {(k + "_mseclip" if k in summary["clipped"] else k): v for k, v in lin.items()}
    if lin:
        mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lin))
    if pal:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=pal))
    log.info("coreml %s: %d linear-quantized, %d palettized weights, %d activation Q/DQ", stage_name,
             len(lin), len(pal), summary.get("qdq_pairs", 0))
    summary["counts"] = {"linear": len(lin), "lut": len(pal), "act_qdq": summary.get("qdq_pairs", 0)}
    return mlmodel, summary
