"""XNNPACK partitioning with the runtime's limits, and delegation statistics of a lowered program.

XNNPACK tensors have at most ``XNN_MAX_TENSOR_DIMS`` = 6 dimensions. ExecuTorch 1.5.1's partitioner
does not check that, so a rank-8 permute (the DiT's unpatchify) is delegated and the program fails
at load time (``Failed to define tensor ... xnn_status_unsupported_parameter``). Nodes touching a
tensor of rank > 6 stay on the portable CPU kernels instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

XNN_MAX_DIMS = 6
# graph plumbing that is neither delegated work nor a CPU kernel worth reporting
_BOOKKEEPING = {"getitem", "executorch_call_delegate"}


def _within_rank(node: torch.fx.Node) -> bool:
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    for v in vals:
        for t in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(t, torch.Tensor) and t.dim() > XNN_MAX_DIMS:
                return False
    return True


def make_partitioner(dynamic: bool = False):
    """An ``XnnpackPartitioner`` whose every op config also rejects tensors of rank > 6."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["config_precisions"] = ConfigPrecisionType.DYNAMIC_QUANT
    part = XnnpackPartitioner(**kwargs)
    for cfg in part.target_partitioner_configs.values():
        original = cfg.check_constraints

        def check(node, ep, _original=original):
            return _within_rank(node) and _original(node, ep)

        cfg.check_constraints = check
    return part


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", str(target))
    return name.replace("aten.", "").replace("dim_order_ops.", "")


def delegation_stats(edge_program) -> dict[str, Any]:
    """Ops inside XNNPACK delegates vs ops left on the portable CPU kernels, by op type."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    gm = edge_program.exported_program().graph_module
    delegated: Counter = Counter()
    fallback: Counter = Counter()
    partitions = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            partitions += 1
            lowered = getattr(gm, node.args[0].target)
            if isinstance(lowered, LoweredBackendModule):
                for inner in lowered.original_module.graph.nodes:
                    if inner.op == "call_function" and _op_name(inner.target) not in _BOOKKEEPING:
                        delegated[_op_name(inner.target)] += 1
        elif name not in _BOOKKEEPING:
            fallback[name] += 1
    nd, nf = sum(delegated.values()), sum(fallback.values())
    return {
        "backend": "XnnpackBackend",
        "partitions": partitions,
        "delegated_nodes": nd,
        "portable_nodes": nf,
        "delegated_fraction": round(nd / max(nd + nf, 1), 4),
        "delegated_ops": dict(sorted(delegated.items())),
        "fallback_ops": dict(sorted(fallback.items())),
    }
