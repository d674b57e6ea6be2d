"""Split one stage graph into a chain of pieces along its DiT groups (Core ML chunks, QNN shards).

A paper-scale ``dit_step`` is too big for one program on a phone: a Core ML ``weight.bin`` over
2 GiB fails to load, an HTP context holds about 4 GB and its graph must fit the TCM at every op.
ml-stable-diffusion's ``--chunk-unet`` and ExecuTorch's Qualcomm LLM ``SplitGraph`` both cut the
network between layers and let the host chain the parts. We do the same once, on the exported
graph, so every target and every rewrite (stock or ANE layout) shares one splitter:

- ``torch.export`` the stage module once; each node's ``nn_module_stack`` says which group
  (``sandwich.groups.N`` / ``ups.N`` / ``downs.N``) it belongs to.
- Groups go to pieces in contiguous ranges balanced by weight bytes (``plan_ranges``).
- A node lands in the piece of its own group, or the latest piece among its inputs (so the
  embeddings go first, the head last, and data only ever flows forward).
- Every tensor a later piece needs becomes an output of its producer and an input of its consumer,
  named ``carry.<node>``; stage inputs and outputs keep their contract names.

Weights are shared with the original module (``get_attr`` references), never copied.
``run_chain`` executes the pieces in order on named tensors; it is what every sharded runner does.
We write this instead of ``torch.fx.passes.split_module`` because we need contract names on every
boundary tensor and a deterministic, balanced group-to-piece assignment.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import InputError
from ..model_zoo.compute_dtype import hooks_suspended, weights_dtype

log = logging.getLogger(__name__)

_GROUP_PATH = re.compile(r"(?:^|\.)sandwich\.(groups|ups|downs)\.(\d+)(?:\.|$)")
CARRY_PREFIX = "carry."


class SplitError(InputError):
    """A piece count that cannot split the graph (more pieces than groups, or not a positive int)."""


@dataclass
class Piece:
    """One program of a chain: a GraphModule over named inputs and outputs, and the groups it holds."""

    index: int
    module: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    groups: tuple[int, int]  # [start, stop) of DiT groups in this piece

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters()) + sum(
            b.numel() * b.element_size() for b in self.module.buffers())


def group_of_path(path: str) -> int | None:
    """DiT group index of a module path (``...sandwich.groups.3.high.0.attn`` -> 3), else None."""
    m = _GROUP_PATH.search(path)
    return int(m.group(2)) if m else None


def group_weight_bytes(module: nn.Module) -> tuple[list[int], int]:
    """Weight bytes per DiT group and outside any group (embeddings, head)."""
    per: dict[int, int] = {}
    other = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        g = group_of_path(name)
        size = t.numel() * t.element_size()
        if g is None:
            other += size
        else:
            per[g] = per.get(g, 0) + size
    if not per:
        raise SplitError("this module has no DiT groups (sandwich.groups.N): only dit_step can be split")
    return [per.get(g, 0) for g in range(max(per) + 1)], other


def plan_ranges(group_bytes: Sequence[int], pieces: int) -> list[tuple[int, int]]:
    """Contiguous group ranges, one per piece, minimising the largest piece's weight bytes.

    Exact linear partition by dynamic programming (at most 64 groups, so O(n^2 k) is instant);
    ties go to the earliest cut, so the plan is deterministic."""
    n = len(group_bytes)
    if not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1:
        raise SplitError(f"the piece count must be a positive integer, got {pieces!r}")
    if pieces > n:
        raise SplitError(f"cannot split {n} DiT groups into {pieces} pieces: use at most {n}")
    prefix = [0]
    for size in group_bytes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[k][j]: smallest possible largest piece when the first j groups form k pieces
    best = [[inf] * (n + 1) for _ in range(pieces + 1)]
    cut = [[0] * (n + 1) for _ in range(pieces + 1)]
    best[0][0] = 0
    for k in range(1, pieces + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cand = max(best[k - 1][i], prefix[j] - prefix[i])
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    ranges, j = [], n
    for k in range(pieces, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def pieces_for_bound(module: nn.Module, bound_bytes: int, bytes_per_weight: float | None = None) -> int:
    """Fewest pieces whose largest one stays under ``bound_bytes`` (weights at ``bytes_per_weight``)."""
    group_bytes, other = group_weight_bytes(module)
    if bytes_per_weight is not None:  # e.g. 2 for an fp16 program from fp32 torch weights
        elem = next(module.parameters()).element_size()
        group_bytes = [int(b * bytes_per_weight / elem) for b in group_bytes]
        other = int(other * bytes_per_weight / elem)
    for n in range(1, len(group_bytes) + 1):
        ranges = plan_ranges(group_bytes, n)
        sizes = [sum(group_bytes[a:b]) for a, b in ranges]
        sizes[0] += other  # embeddings and head are small; count them against the first piece
        if max(sizes) <= bound_bytes:
            return n
    return len(group_bytes)


def _node_groups(node: fx.Node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        g = group_of_path(path)
        if g is not None:
            return g
    return None


def split_graph(module: nn.Module, example_inputs: Sequence[torch.Tensor], input_names: Sequence[str],
                output_names: Sequence[str], pieces: int) -> list[Piece]:
    """``module`` (positional tensors in, a tuple out) as ``pieces`` chained GraphModules."""
    group_bytes, _ = group_weight_bytes(module)
    ranges = plan_ranges(group_bytes, pieces)
    piece_of_group = {g: i for i, (a, b) in enumerate(ranges) for g in range(a, b)}
    # trace in the weights' stored dtype (an fp16 checkpoint stays fp16, without its host widening
    # hooks); promote_piece turns each piece to fp32 when a target converts it
    dtype = weights_dtype(module)
    example_inputs = [x.to(dtype) if x.is_floating_point() else x for x in example_inputs]
    with torch.no_grad(), hooks_suspended(module):
        ep = torch.export.export(module.eval(), tuple(example_inputs), strict=False)
    gm = ep.module()
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(input_names):
        raise ValueError(f"export gave {len(placeholders)} inputs, the contract names {len(input_names)}")
    (out_node,) = [n for n in graph.nodes if n.op == "output"]
    outs = list(out_node.args[0])
    if len(outs) != len(output_names):
        raise ValueError(f"export gave {len(outs)} outputs, the contract names {len(output_names)}")

    name_of: dict[fx.Node, str] = {p: n for p, n in zip(placeholders, input_names)}
    for node, name in zip(outs, output_names):
        if node in name_of:  # an input returned as is: not a piece output
            raise ValueError(f"output {name!r} is the input {name_of[node]!r} unchanged; cannot split it")
        name_of[node] = name
    # Forward: the earliest piece each node may run in. Only ops inside a module's ``forward`` carry
    # a group in their module stack (``blk.step`` code does not), so ungrouped nodes are then moved
    # as late as their first consumer allows: a cache reduction runs beside the block that reads it
    # instead of being carried from piece 0.
    piece_of: dict[fx.Node, int] = {}
    grouped: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        own = _node_groups(node)
        start = piece_of_group[own] if own is not None else 0
        if own is not None:
            grouped.add(node)
        piece_of[node] = max([start, *(piece_of[a] for a in node.all_input_nodes if a in piece_of)])
    for node in reversed(list(graph.nodes)):
        if node in piece_of and node not in grouped:
            users = [piece_of[u] for u in node.users if u in piece_of]
            if users:
                piece_of[node] = max(piece_of[node], min(users))
    for node in graph.nodes:  # a multi-output op's elements stay with it: only tensors cross pieces
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in piece_of:
            piece_of[node] = piece_of[node.args[0]]

    def boundary_name(node: fx.Node) -> str:
        return name_of.get(node, CARRY_PREFIX + node.name)

    result: list[Piece] = []
    for i, (a, b) in enumerate(ranges):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        in_names: list[str] = []
        members = [n for n in graph.nodes if piece_of.get(n) == i]
        member_set = set(members)

        def arg_of(src: fx.Node) -> fx.Node:
            if src in env:
                return env[src]
            if src.op == "get_attr":
                env[src] = g.get_attr(src.target)
            else:  # a stage input or a tensor an earlier piece computed
                nm = boundary_name(src)
                env[src] = g.placeholder(re.sub(r"\W", "_", nm))
                env[src].meta = dict(src.meta)
                in_names.append(nm)
            return env[src]

        for node in members:
            for src in node.all_input_nodes:
                if src not in member_set:
                    arg_of(src)
            env[node] = g.node_copy(node, lambda n: env[n])
        produced = [n for n in members if n in outs or any(piece_of.get(u, -1) > i for u in n.users)]
        g.output(tuple(env[n] for n in produced))
        piece_mod = fx.GraphModule(gm, g, class_name=f"Piece{i}")
        result.append(Piece(i, piece_mod, in_names, [boundary_name(n) for n in produced], (a, b)))
    _check_chain(result, input_names, output_names)
    log.info("split %s into %d pieces over groups %s", type(module).__name__, pieces, ranges)
    return result


def promote_piece(piece: Piece, dtype: torch.dtype = torch.float32) -> Piece:
    """A copy of ``piece`` computing in ``dtype``: its weights cast (this piece's only, so a chain of
    fp16 pieces is converted one fp32 piece at a time) and every dtype the trace recorded for the
    weights' old float dtype (``_to_copy``, ``full``...) rewritten to ``dtype``."""
    old = {t.dtype for t in [*piece.module.parameters(), *piece.module.buffers()] if t.is_floating_point()}
    if old <= {dtype}:
        return piece
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, torch.Tensor] = {}
    for node in piece.module.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":
            value = _resolve_attr(piece.module, node.target)
            attrs[node.target] = value.to(dtype) if value.is_floating_point() else value
        if node.kwargs.get("dtype") in old:
            new.kwargs = {**node.kwargs, "dtype": dtype}
        new.args = tuple(dtype if a in old else a for a in new.args)  # positional dtypes (aten.to)
        env[node] = new
    module = fx.GraphModule(attrs, graph, class_name=type(piece.module).__name__)
    return Piece(piece.index, module, list(piece.input_names), list(piece.output_names), piece.groups)


def _resolve_attr(module: nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _check_chain(pieces: list[Piece], input_names: Sequence[str], output_names: Sequence[str]) -> None:
    known = set(input_names)
    for p in pieces:
        missing = [n for n in p.input_names if n not in known]
        if missing:
            raise AssertionError(f"piece {p.index} reads {missing} before any piece produced them")
        known.update(p.output_names)
    absent = [n for n in output_names if n not in known]
    if absent:
        raise AssertionError(f"no piece produces the stage outputs {absent}")


def run_chain(pieces: Sequence, inputs: Mapping[str, object], run: Callable[[object, dict], dict],
              output_names: Sequence[str]) -> dict:
    """Run pieces in order: ``run(piece, named_inputs) -> named_outputs``; return the stage outputs.

    ``pieces`` need ``input_names`` / ``output_names``; ``run`` executes one (torch, a compiled
    program, an emulator). Intermediate tensors live only as long as a later piece reads them."""
    env = dict(inputs)
    last_use = {}
    for i, p in enumerate(pieces):
        for n in p.input_names:
            last_use[n] = i
    for i, p in enumerate(pieces):
        outs = run(p, {n: env[n] for n in p.input_names})
        env.update(outs)
        for n in [k for k, v in last_use.items() if v == i and k.startswith(CARRY_PREFIX)]:
            env.pop(n, None)
    return {n: env[n] for n in output_names}


def torch_piece_run(piece: Piece, named: dict) -> dict:
    """One piece in torch (the float reference of a compiled piece)."""
    with torch.no_grad():
        outs = piece.module(*(named[n] for n in piece.input_names))
    return dict(zip(piece.output_names, outs))


def describe(pieces: Sequence[Piece]) -> list[dict]:
    """Manifest-friendly summary: groups, boundary tensors, weight size per piece."""
    return [{"index": p.index, "groups": list(p.groups), "inputs": list(p.input_names),
             "outputs": list(p.output_names), "weight_mb": round(p.weight_bytes / 2**20, 2)} for p in pieces]


__all__ = ["CARRY_PREFIX", "Piece", "SplitError", "describe", "group_weight_bytes",
           "pieces_for_bound", "plan_ranges", "promote_piece", "run_chain", "split_graph", "torch_piece_run"]
