"""Predict which ops of a Core ML ML program run on the Apple Neural Engine, and why not.

``analyze(program)`` walks a pymil program (``mlmodel._mil_program``, or a saved ``.mlpackage``
read back with coremltools' MIL-proto loader), applies the rules of ``ane_rules`` to every op and
returns a JSON-able report: share of ops and of FLOPs predicted on the ANE, the rules that fired,
the op inventory, rank-5 tensors, and transposes/reshapes per DiT block. ``write_report`` writes it
as ``.json`` and ``.md``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from . import ane_rules as R

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"groups[._](\d+)[._](high|low)[._](\d+)")


def load_mil_program(model_or_path: Any):
    """A pymil Program from an MLModel, a Program, or a saved .mlpackage path."""
    if hasattr(model_or_path, "functions"):
        return model_or_path
    prog = getattr(model_or_path, "_mil_program", None)
    if prog is not None:
        return prog
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    path = Path(str(model_or_path))
    model = model_or_path if hasattr(model_or_path, "get_spec") else ct.models.MLModel(str(path), skip_model_load=True)
    weights = Path(model.weights_dir) if getattr(model, "weights_dir", None) else path / "Data/com.apple.CoreML/weights"
    spec = model.get_spec()
    return load(spec, spec.specificationVersion, str(weights))


def _types():
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    return types, is_symbolic


def is_const(op) -> bool:
    """A const or constexpr op (weights: not work of its own)."""
    return op is not None and (op.op_type in R.CONST_OPS or op.op_type.startswith(R.CONST_PREFIX))


def _tensor_vars(op) -> list:
    """Outputs plus non-constant inputs (function inputs and computed values)."""
    out = list(op.outputs)
    for v in op.inputs.values():
        for var in v if isinstance(v, (list, tuple)) else (v,):
            if not is_const(getattr(var, "op", None)):
                out.append(var)
    return out


def _numel(var) -> int:
    shape = getattr(var, "shape", ()) or ()
    return int(math.prod(d if isinstance(d, int) else 1 for d in shape))


def op_flops(op) -> int:
    t = op.op_type
    n_out = _numel(op.outputs[0]) if op.outputs else 0
    if t == "conv":
        return 2 * n_out * int(math.prod(op.weight.shape[1:]))
    if t == "conv_transpose":
        return 2 * _numel(op.x) * int(math.prod(op.weight.shape[1:]))
    if t == "matmul":
        tx = bool(op.transpose_x.val) if op.transpose_x is not None else False
        k = op.x.shape[-2] if tx else op.x.shape[-1]
        return 2 * n_out * int(k)
    if t == "linear":
        return 2 * n_out * int(op.weight.shape[-1])
    if t == "scaled_dot_product_attention":  # QK^T and PV: 2 * 2 * n * M * d per batch-head
        q, k = op.query.shape, op.key.shape
        return 4 * int(math.prod(q[:-1])) * int(k[-2]) * int(q[-1])
    if t in ("softmax", "layer_norm", "instance_norm", "batch_norm"):
        return 5 * n_out
    return n_out


def _blockwise(var) -> bool:
    src = getattr(var, "op", None)
    if src is None or src.op_type != "constexpr_blockwise_shift_scale":
        return False
    data, scale = src.data.shape, src.scale.shape
    return any(1 < s < d for s, d in zip(scale, data))


def op_rules(op) -> list[str]:
    """Ids of the rules that exclude ``op`` from the ANE (empty: predicted on the ANE)."""
    types, is_symbolic = _types()
    hits: list[str] = []
    tvars = [v for v in _tensor_vars(op) if getattr(v, "dtype", None) is not None]
    dts = {types.builtin_to_string(v.dtype) for v in tvars}
    if "fp32" in dts or "fp64" in dts:
        hits.append("fp32_compute")
    non_float = [d for d in dts if not d.startswith("fp")]
    if non_float and op.op_type not in ("quantize", "dequantize") and not all(
            d in ("int8", "uint8") for d in non_float):
        hits.append("integer_compute")
    shapes = [tuple(v.shape) for v in tvars if getattr(v, "shape", None) is not None]
    if any(len(s) > R.MAX_RANK for s in shapes):
        hits.append("rank_gt_4")
    if any(is_symbolic(d) or not isinstance(d, int) for s in shapes for d in s):
        hits.append("dynamic_shape")
    if op.op_type in ("conv", "conv_transpose") and len(op.weight.shape) == 5:
        hits.append("conv3d")
    if op.op_type in R.GATHER_OPS:
        hits.append("gather")
    inputs = [x for v in op.inputs.values() for x in (v if isinstance(v, (list, tuple)) else (v,))]
    if any(_blockwise(v) for v in inputs):
        hits.append("blockwise_weight_quant")
    if any(isinstance(d, int) and d > R.MAX_DIM for s in shapes for d in s):
        hits.append("oversized_dim")
    if op.op_type in R.SDPA_OPS:
        hits.append("fused_sdpa")
    elif op.op_type not in R.ANE_OPS:
        hits.append("unsupported_op")
    return hits


def walk_ops(block):
    """Every op of a block, nested blocks included, in program order."""
    for op in block.operations:
        yield op
        for sub in getattr(op, "blocks", []) or []:
            yield from walk_ops(sub)


def block_of(name: str, node_blocks: dict[str, str] | None) -> str:
    """DiT block of an op: from torch node -> module path attribution, else from the name itself."""
    if node_blocks:
        cand = name
        while cand:
            if cand in node_blocks:
                return node_blocks[cand]
            if "_" not in cand:
                break
            cand = cand.rsplit("_", 1)[0]
    m = _BLOCK_RE.search(name)
    return f"groups.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else "other"


def analyze(model_or_program: Any, title: str = "", node_blocks: dict[str, str] | None = None,
            function: str = "main") -> dict[str, Any]:
    types, _ = _types()
    prog = load_mil_program(model_or_program)
    func = prog.functions[function]
    ops, inventory = [], defaultdict(lambda: {"count": 0, "on_ane": 0, "flops": 0})
    rule_ops, rule_flops = Counter(), Counter()
    per_block: dict[str, Counter] = defaultdict(Counter)
    rank_hist, seen_vars = Counter(), set()
    for op in walk_ops(func):
        if is_const(op):
            continue
        hits = op_rules(op)
        flops = op_flops(op)
        blk = block_of(op.name, node_blocks)
        inv = inventory[op.op_type]
        inv["count"] += 1
        inv["flops"] += flops
        inv["on_ane"] += not hits
        for h in hits:
            rule_ops[h] += 1
            rule_flops[h] += flops
        per_block[blk]["ops"] += 1
        if op.op_type in R.LAYOUT_OPS:
            per_block[blk][op.op_type] += 1
        for v in _tensor_vars(op):
            if id(v) not in seen_vars and getattr(v, "shape", None) is not None:
                seen_vars.add(id(v))
                rank_hist[len(v.shape)] += 1
        ops.append({"name": op.name, "type": op.op_type, "block": blk, "flops": flops, "on_ane": not hits,
                    "rules": hits, "shapes": [list(map(str, o.shape)) for o in op.outputs if o.shape is not None],
                    "dtypes": [types.builtin_to_string(o.dtype) for o in op.outputs if o.dtype is not None]})
    n_ops = len(ops)
    n_ane = sum(o["on_ane"] for o in ops)
    total = sum(o["flops"] for o in ops)
    ane_flops = sum(o["flops"] for o in ops if o["on_ane"])
    blocks = {b: dict(c) for b, c in sorted(per_block.items()) if b != "other"}
    summary = {
        "ops": n_ops, "ops_on_ane": n_ane, "op_share_ane": n_ane / n_ops if n_ops else 0.0,
        "flops": total, "flops_on_ane": ane_flops, "flop_share_ane": ane_flops / total if total else 0.0,
        "rank5_tensors": rank_hist.get(5, 0), "rank_gt4_tensors": sum(v for k, v in rank_hist.items() if k > 4),
        "max_rank": max(rank_hist) if rank_hist else 0,
        "transposes": sum(1 for o in ops if o["type"] == "transpose"),
        "reshapes": sum(1 for o in ops if o["type"] == "reshape"),
        "rule_hits": dict(rule_ops), "rule_flops": dict(rule_flops),
        "blocks": len(blocks),
    }
    return {"title": title, "summary": summary, "rules": R.rules_table(),
            "inventory": dict(sorted(inventory.items(), key=lambda kv: -kv[1]["flops"])),
            "blocks": blocks, "rank_histogram": dict(sorted(rank_hist.items())),
            "off_ane_ops": [o for o in ops if not o["on_ane"]], "num_ops_listed": n_ops}


def to_markdown(report: dict[str, Any], max_rows: int = 40) -> str:
    s = report["summary"]
    lines = [f"# ANE residency: {report['title']}", "",
             "| ops | on ANE | op share | GFLOPs | FLOP share on ANE | rank-5 tensors | rank > 4 | transposes | reshapes |",
             "|---|---|---|---|---|---|---|---|---|",
             (f"| {s['ops']} | {s['ops_on_ane']} | {s['op_share_ane']:.2%} | {s['flops'] / 1e9:.3f} | "
              f"{s['flop_share_ane']:.4%} | {s['rank5_tensors']} | {s['rank_gt4_tensors']} | {s['transposes']} | "
              f"{s['reshapes']} |"),
             "", "## Rules that fired", "", "| rule | ops | GFLOPs | source |", "|---|---|---|---|"]
    src = {r["id"]: r["source"] for r in report["rules"]}
    for rid, n in sorted(s["rule_hits"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {rid} | {n} | {s['rule_flops'][rid] / 1e9:.3f} | {src[rid]} |")
    lines += ["", "## Op inventory", "", "| op | count | on ANE | GFLOPs |", "|---|---|---|---|"]
    for t, inv in report["inventory"].items():
        lines.append(f"| {t} | {inv['count']} | {inv['on_ane']} | {inv['flops'] / 1e9:.4f} |")
    if report["blocks"]:
        lines += ["", "## Layout ops per block", "", "| block | ops | transpose | reshape | expand_dims | squeeze |",
                  "|---|---|---|---|---|---|"]
        for b, c in report["blocks"].items():
            lines.append(f"| {b} | {c.get('ops', 0)} | {c.get('transpose', 0)} | {c.get('reshape', 0)} | "
                         f"{c.get('expand_dims', 0)} | {c.get('squeeze', 0)} |")
    off = report["off_ane_ops"]
    if off:
        lines += ["", f"## Ops predicted off the ANE (first {min(max_rows, len(off))} of {len(off)})", "",
                  "| op | type | block | rules | shapes |", "|---|---|---|---|---|"]
        for o in off[:max_rows]:
            lines.append(f"| {o['name']} | {o['type']} | {o['block']} | {', '.join(o['rules'])} | {o['shapes']} |")
    lines += ["", "## Rules", "", "| id | description | source | note |", "|---|---|---|---|"]
    for r in report["rules"]:
        lines.append(f"| {r['id']} | {r['description']} | {r['source']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write ``<path>.json`` and ``<path>.md`` (``path`` may carry either suffix or none)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".json", ".md") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    jp, mp = base.with_suffix(".json"), base.with_suffix(".md")
    jp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    mp.write_text(to_markdown(report))
    log.info("ANE residency report: %s, %s", jp, mp)
    return jp, mp
