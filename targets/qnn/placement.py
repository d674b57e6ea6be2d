"""Where each op of a lowered ``.pte`` runs (HTP, XNNPACK, portable CPU kernels) and why.

The record is target-neutral on purpose (the same keys can describe Core ML or ONNX placement):
``{"ops": {"htp": n, "xnnpack": n, "cpu": n}, "op_share_accelerator": x,
"flop_share_accelerator": y, "fallbacks": [{"op", "count", "placed", "reason"}]}``, plus the
FLOPs per place, the delegate subgraph counts and the ops decomposed so HTP could take them.
FLOPs are counted from the graph's shapes: 2*MACs for convolutions and matrix products, one per
output element for other compute ops, none for layout / copy / (de)quantize ops.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .libs import classify_native

PLACES = ("htp", "xnnpack", "cpu")
BACKEND_PLACE = {"QnnBackend": "htp", "XnnpackBackend": "xnnpack"}
SKIP_TARGETS = {"getitem", "executorch_call_delegate"}
_NO_FLOPS = re.compile(r"(view|reshape|permute|transpose|slice|select|cat|stack|split|unbind|expand|"
                       r"squeeze|unsqueeze|clone|copy|_to_copy|quantize|dequantize|alias|pad|full|"
                       r"zeros|ones|repeat|index|gather|pixel_shuffle|pixel_unshuffle|flip)")
_MATMUL = re.compile(r"\b(mm|bmm|matmul|linear|addmm)\b")


def op_name(target: Any) -> str:
    """'aten.hardswish.default' for an ATen or edge op overload (the name the QNN logs use)."""
    base = target if isinstance(target, torch._ops.OpOverload) else getattr(target, "_op", target)
    name = getattr(base, "__name__", str(base))
    if isinstance(base, torch._ops.OpOverload) and not name.startswith(base.namespace + "."):
        name = f"{base.namespace}.{name}"
    return name


def _numel(val: Any) -> int:
    if isinstance(val, torch.Tensor):
        return int(math.prod(val.shape))
    if isinstance(val, (list, tuple)):
        return sum(_numel(v) for v in val)
    return 0


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None


def node_flops(node: torch.fx.Node) -> int:
    """Floating-point operations of one call_function node, from its meta shapes."""
    name = op_name(node.target).split(".")[1] if "." in op_name(node.target) else op_name(node.target)
    out = _numel(node.meta.get("val"))
    if name == "convolution" or name.startswith("conv"):
        w = _val(node.args[1]) if len(node.args) > 1 else None
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            # MACs per output element = in_channels/groups * kernel volume = weight numel / out channels
            return 2 * out * int(math.prod(w.shape)) // max(int(w.shape[0]), 1)
        return out
    if _MATMUL.search(name):
        a = _val(node.args[1] if name == "addmm" else node.args[0])
        k = int(a.shape[-1]) if isinstance(a, torch.Tensor) and a.dim() else 1
        return 2 * out * k
    if _NO_FLOPS.search(name):
        return 0
    return out


def _compute_nodes(graph: torch.fx.Graph):
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", str(n.target)) not in SKIP_TARGETS:
            yield n


def qnn_node_messages(native: list[str]) -> dict[str, list[str]]:
    """QNN validation errors per node name ("Failed to validate op NAME" and the errors before it)."""
    real, _ = classify_native(native)
    out: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in real:
        if "<E>" not in line:
            continue
        msg = line.split("<E>", 1)[1].strip()
        m = re.match(r"Failed to validate op (\S+)", msg)
        if m:
            out.setdefault(m.group(1), [])
            for p in pending:
                if p not in out[m.group(1)]:
                    out[m.group(1)].append(p)
            pending = []
        elif "validateOpConfig" not in msg:
            pending.append(re.sub(r"^\[\d+\]\s*", "", msg))
    return out


def partitioner_reasons(partitioner_log: list[str]) -> dict[str, list[str]]:
    """Op name -> the QNN partitioner's reasons for not claiming it ('False' = the backend said no)."""
    reasons: dict[str, list[str]] = {}
    for msg in partitioner_log:
        m = re.match(r"\[[^\]]+\]\s+(\S+)\s+\|\s+(.*)", msg)
        if m and m.group(2) not in ("True", "Forced Passed"):
            rs = reasons.setdefault(m.group(1), [])
            if m.group(2) not in rs:
                rs.append(m.group(2))
    return reasons


def xnnpack_reasons(xnnpack_log: Sequence[str]) -> dict[str, str]:
    """Node name -> XNNPACK's WhyNoPartition reason."""
    out: dict[str, str] = {}
    for msg in xnnpack_log:
        m = re.match(r"WhyNoPartition: Node (\S+) was not partitioned because (.*?)\.?$", msg)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def _reason(op: str, place: str, names: set[str], reasons: dict[str, list[str]],
            messages: dict[str, list[str]], xnn: dict[str, str]) -> str:
    why = [r if r != "False" else "QNN backend op validation failed" for r in reasons.get(op, [])]
    val = sorted({m for n in names for m in messages.get(n, [])})
    text = "; ".join(why) or "not claimed by the QNN partitioner"
    text += f" (QNN: {'; '.join(val[:3])})" if val else ""
    if place == "cpu":
        xw = sorted({xnn[n] for n in names if n in xnn})
        text += "; XNNPACK: " + ("; ".join(xw[:3]) if xw else "no XNNPACK partitioner config takes it")
    return text


def placement_report(edge_manager, partitioner_log: list[str], native: list[str],
                     decomposed: dict[str, dict[str, Any]] | None = None, xnnpack_log: Sequence[str] = ()
                     ) -> dict[str, Any]:
    """The placement record of one lowered program (keys in the module docstring)."""
    gm = edge_manager.exported_program().graph_module
    ops: Counter = Counter()
    flops: Counter = Counter()
    subgraphs: Counter = Counter()
    by_op: dict[str, Counter] = {p: Counter() for p in PLACES}
    names: dict[tuple[str, str], set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("lowered_module"):
            lowered = getattr(gm, node.target)
            place = BACKEND_PLACE.get(lowered.backend_id, "cpu")
            subgraphs[place] += 1
            inner = list(_compute_nodes(lowered.original_module.graph))
        elif node.op == "call_function" and getattr(node.target, "__name__", "") not in SKIP_TARGETS:
            place, inner = "cpu", [node]
        else:
            continue
        for n in inner:
            op = op_name(n.target)
            ops[place] += 1
            flops[place] += node_flops(n)
            by_op[place][op] += 1
            names.setdefault((place, op), set()).add(n.name)
    total_ops, total_flops = sum(ops.values()), sum(flops.values())
    reasons, messages = partitioner_reasons(partitioner_log), qnn_node_messages(native)
    xnn = xnnpack_reasons(xnnpack_log)
    fallbacks = [{"op": op, "count": n, "placed": place,
                  "reason": _reason(op, place, names[(place, op)], reasons, messages, xnn)}
                 for place in ("xnnpack", "cpu") for op, n in sorted(by_op[place].items())]
    return {
        "ops": {p: int(ops[p]) for p in PLACES},
        "op_share_accelerator": round(ops["htp"] / total_ops, 4) if total_ops else 1.0,
        "flops": {p: int(flops[p]) for p in PLACES},
        "flop_share_accelerator": round(flops["htp"] / total_flops, 4) if total_flops else 1.0,
        "subgraphs": {p: int(subgraphs[p]) for p in ("htp", "xnnpack")},
        "accelerator": "htp",
        "fallbacks": fallbacks,
        "decomposed": [{"op": op, **info} for op, info in sorted((decomposed or {}).items())],
        "htp_by_op": dict(sorted(by_op["htp"].items())),
    }
