"""Lower one ATen program to QNN HTP first, XNNPACK for what QNN leaves, portable kernels last.

Why not ``to_edge_transform_and_lower_to_qnn``: QnnPartitioner asks to_edge to keep a fixed list
of ops un-decomposed (``hardswish``, ``linear``, ``pixel_shuffle``, ``instance_norm``, ...; see
``get_skip_decomp_table``) with a filter that never asks the QNN backend whether it takes *that*
node (XNNPACK's filter does). A kept op that HTP then rejects (the decoder's ``hardswish`` at rank
5: "has incorrect Rank 5") is left in the graph as a non-core op that neither XNNPACK nor the
portable kernels implement, and to_edge fails with "was not decomposed or delegated".

Here the partitioner runs QNN's own op-support check first; kept ops it rejects end the attempt
before any HTP graph is built, and the next attempt decomposes exactly those nodes into core
ATen. HTP then takes the pieces it supports (hardswish -> add / clamp / mul / div, all fine at
rank 5), XNNPACK the rest it can, and ExecuTorch's portable kernels whatever is left, all in one
``.pte``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .decompose import decompose_for_qnn
from .placement import op_name

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 4
NO_BUILDER_REASON = ("no QNN op builder (partitioner: No node visitor); decomposed into mean / sub / mul, "
                     "which HTP takes")
MAX_NODE_NAMES = 12  # node names kept per decomposed op in the record


class _Rejected(Exception):
    """QNN rejected kept (un-decomposed) nodes: {node key: edge node name}."""

    def __init__(self, nodes: dict[str, str]):
        super().__init__(f"{len(nodes)} kept ops rejected by QNN")
        self.nodes = nodes


def node_key(node: torch.fx.Node) -> str:
    """'aten.hardswish.default@hardswish_3': op + the name of the node it was traced as.

    Stable between two lowerings of the same module, and the same for a node in the ATen
    program (where to_edge asks what to keep) and in the edge program (where QNN checks it).
    """
    src = (node.meta.get("from_node") or [None])[-1]
    name = node.name
    while src is not None:
        name = src.name
        src = src.from_node[-1] if getattr(src, "from_node", None) else None
    return f"{op_name(node.target)}@{name}"


def _partitioner_cls():
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.partition.utils import filter_fn, get_skip_decomp_table
    from executorch.exir.backend.partitioner import PartitionResult
    from executorch.exir.backend.utils import tag_constant_data, tag_mutated_buffer

    class CheckedQnnPartitioner(QnnPartitioner):
        """QnnPartitioner that keeps an op un-decomposed only where QNN's backend accepts the node."""

        def __init__(self, compiler_specs, rejected: set[str], probe: bool = False, also_kept=()):
            super().__init__(compiler_specs)
            self.rejected, self.probe = set(rejected), probe
            # ops kept un-decomposed by this partitioner or by the fallback partitioner after it
            self.kept = {op_name(op) for op in get_skip_decomp_table()} | set(also_kept)

        def ops_to_not_decompose(self, ep):
            ops, _ = super().ops_to_not_decompose(ep)
            return ops, lambda node: filter_fn(node) and node_key(node) not in self.rejected

        def partition(self, edge_program):
            partitions = self.generate_partitions(edge_program)  # QNN op-support check, node by node
            del self.op_support_checker
            claimed = {n for p in partitions for n in p.nodes}
            left = {node_key(n): n.name for n in edge_program.graph_module.graph.nodes
                    if n.op == "call_function" and n not in claimed and op_name(n.target) in self.kept
                    and op_name(n.target).startswith("aten.") and filter_fn(n)}
            # a rejected op with no decomposition stays as it is: XNNPACK / portable kernels get it
            left = {k: v for k, v in left.items() if k not in self.rejected}
            if left or self.probe:
                raise _Rejected(left)
            self.tag_nodes(partitions, edge_program)
            tag_constant_data(edge_program)
            if not self.skip_mutable_buffer:
                tag_mutated_buffer(edge_program)
            return PartitionResult(tagged_exported_program=edge_program, partition_tags=self.partition_tags)

    return CheckedQnnPartitioner


def _rank_guard(check):
    """XNNPACK's configs accept views / permutes of any rank ahead of time, but its runtime stops
    at XNN_MAX_TENSOR_DIMS (6): "Failed to define tensor ... unsupported_parameter" at load."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import why
    from executorch.backends.xnnpack.utils.xnnpack_constants import XNN_MAX_TENSOR_DIMS

    def guarded(node: torch.fx.Node, ep) -> bool:
        vals = [node.meta.get("val"), *(a.meta.get("val") for a in node.all_input_nodes)]
        rank = max((v.dim() for v in vals if isinstance(v, torch.Tensor)), default=0)
        if rank > XNN_MAX_TENSOR_DIMS:
            why(node, reason=f"rank {rank} tensor; the XNNPACK runtime takes at most {XNN_MAX_TENSOR_DIMS}")
            return False
        return check(node, ep)

    return guarded


def _xnnpack_after_qnn(specs: list, rejected: set[str]):
    """(XnnpackPartitioner that also keeps what QNN keeps, and the names of the ops it keeps).

    to_edge_transform_and_lower restores each partitioner's kept ops to plain ATen before the
    next partitioner's decomposition pass, so without this XNNPACK's pass decomposes QNN's kept
    ops (measured: the DiT's pixel_shuffle became rank-6 view/permute, which QNN rejects). Nodes
    QNN rejected are not kept for XNNPACK either: decomposed, HTP may take the pieces.
    """
    from executorch.backends.qualcomm.partition.utils import filter_fn, get_skip_decomp_table
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    qnn_ops = list(get_skip_decomp_table())
    qnn_names = {op_name(op) for op in qnn_ops}

    class XnnpackAfterQnn(XnnpackPartitioner):
        def __init__(self):
            super().__init__()
            for config in self.target_partitioner_configs.values():
                config.check_constraints = _rank_guard(config.check_constraints)

        def ops_to_not_decompose(self, ep):
            ops, own = super().ops_to_not_decompose(ep)

            def keep(node: torch.fx.Node) -> bool:
                if node.op != "call_function" or node_key(node) in rejected:
                    return False
                if op_name(node.target) in qnn_names and filter_fn(node):
                    return True
                return own(node)

            return list(dict.fromkeys([*ops, *qnn_ops])), keep

    xnn = XnnpackAfterQnn()
    own_ops = XnnpackPartitioner.ops_to_not_decompose(xnn, None)[0]
    return xnn, {op_name(op) for op in own_ops if op_name(op).startswith("aten.")}  # not quant primitives


def _lower_once(module, example: tuple, specs: list, rejected: set[str], fallback: bool, probe: bool = False):
    from executorch.backends.qualcomm.partition.utils import generate_qnn_executorch_option
    from executorch.backends.qualcomm.serialization.qc_schema_serialize import flatbuffer_to_option
    from executorch.backends.qualcomm.utils.qnn_manager_lifecycle import QnnManagerContext
    from executorch.backends.qualcomm._passes.qnn_pass_manager import get_qnn_pass_manager_cls
    from executorch.backends.qualcomm.utils.utils import qnn_edge_config
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module, example, strict=True)
    ep, decomposed = decompose_for_qnn(ep)
    backend = flatbuffer_to_option(generate_qnn_executorch_option(specs)).backend_options.backend_type
    passes = get_qnn_pass_manager_cls(backend)()
    aten = passes.transform_for_export_pipeline(ep)
    transform = passes.get_to_edge_transform_passes(ep, compiler_specs=specs)
    partitioners: list = []
    if fallback:
        xnn, xnn_kept = _xnnpack_after_qnn(specs, rejected)
        partitioners = [_partitioner_cls()(specs, rejected, probe, xnn_kept), xnn]
    else:
        partitioners = [_partitioner_cls()(specs, rejected, probe)]
    with QnnManagerContext({"forward": specs}):
        edge = to_edge_transform_and_lower({"forward": aten}, transform_passes={"forward": transform},
                                           partitioner={"forward": partitioners},
                                           compile_config=qnn_edge_config())
    return edge, decomposed


def rejected_kept_ops(module: torch.nn.Module, example: tuple, specs: list) -> dict[str, dict[str, Any]]:
    """{op: {"count", "nodes", "reason"}} of kept (un-decomposed) ops QNN's backend rejects, found
    without building any HTP graph.

    A quantized graph must have them decomposed *before* PT2E annotates it: decomposed after,
    the pieces carry no quantization parameters and the quantized HTP backend rejects them too
    (measured: the tiny decoder's 9 hardswish became 27 float add/mul/div on XNNPACK).
    """
    from executorch.backends.qualcomm.utils.utils import disable_mkldnn_on_amd, setup_qnn_sdk

    setup_qnn_sdk()
    disable_mkldnn_on_amd()
    try:
        _lower_once(module, example, specs, set(), fallback=False, probe=True)
    except _Rejected as exc:
        return _records(exc.nodes, "rejected by QNN's backend validation as one op (probed on the float "
                        "graph); decomposed into core ATen ops before quantization")
    raise RuntimeError("the QNN probe partitioner did not run")


def _records(nodes: dict[str, str], reason: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, edge_name in sorted(nodes.items()):
        entry = out.setdefault(key.split("@")[0], {"count": 0, "nodes": [], "reason": reason})
        entry["count"] += 1
        if len(entry["nodes"]) < MAX_NODE_NAMES:
            entry["nodes"].append(edge_name)
    return out


def lower_to_edge(module: torch.nn.Module, example: tuple, specs: list, fallback: bool = True
                  ) -> tuple[Any, dict[str, dict[str, Any]]]:
    """(edge program manager, {op: {"count", "reason", "nodes"}} decomposed so HTP could take it).

    ``fallback=False`` leaves what QNN does not take to the portable kernels (no XNNPACK).
    """
    from executorch.backends.qualcomm.utils.utils import disable_mkldnn_on_amd, setup_qnn_sdk

    setup_qnn_sdk()
    disable_mkldnn_on_amd()
    rejected: dict[str, str] = {}
    for attempt in range(MAX_ATTEMPTS):
        try:
            edge, decomposed = _lower_once(module, example, specs, set(rejected), fallback)
            break
        except _Rejected as exc:
            rejected.update(exc.nodes)
            log.info("QNN rejected %d kept ops (%s); decomposing them (attempt %d)", len(exc.nodes),
                     ", ".join(sorted({k.split("@")[0] for k in exc.nodes})), attempt + 2)
    else:
        raise RuntimeError(f"QNN kept rejecting un-decomposed ops after {MAX_ATTEMPTS} attempts: "
                           f"{sorted(rejected)[:10]}")
    out: dict[str, dict[str, Any]] = {}
    for op, n in decomposed.items():
        out[op] = {"count": n, "nodes": [], "reason": NO_BUILDER_REASON}
    out.update(_records(rejected, "rejected by QNN's backend validation as one op; decomposed into core "
                        "ATen ops before partitioning"))
    return edge, out
