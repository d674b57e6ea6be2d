"""Decompositions applied to a stage's ATen graph before QNN sees it, so HTP can take the pieces.

ExecuTorch's QNN backend has no op builder for ``aten.var_mean`` (the partitioner logs "No node
visitor, unsupported"; its own ``DecomposeVar`` pass covers ``aten.var`` only), and it is core
ATen, so to_edge keeps it as it is: every per-frame GroupNorm of the decoder became a CPU island
between two HTP graphs (19 QNN subgraphs for the tiny decoder). Written as two-pass mean / subtract / square / mean, which
QNN's mean.dim, sub and mul builders take at rank 5, the statistics stay on HTP, and the PT2E
quantizer (applied after this) annotates the pieces like any other op.

The two-pass form is exact in real arithmetic and, unlike E[x^2] - E[x]^2, does not cancel in
fp16 or 8-bit activations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from s2dit_deploy.targets.decompositions import VARIANCE

log = logging.getLogger(__name__)


def qnn_decompositions() -> dict:
    """ATen op -> decomposition for ops QNN has no builder for (see the module docstring)."""
    return dict(VARIANCE)


def _count(ep: torch.export.ExportedProgram, ops) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in ops)


def _core_decomposition(name: str):
    """The core ATen decomposition of an op named like 'aten.hardswish.default' (KeyError if none)."""
    from torch._decomp import core_aten_decompositions

    for op, fn in core_aten_decompositions().items():
        if str(op) == name:
            return op, fn
    raise KeyError(f"{name} has no core ATen decomposition")


def decompose_for_qnn(ep: torch.export.ExportedProgram, also: Sequence[str] = ()
                      ) -> tuple[torch.export.ExportedProgram, dict[str, int]]:
    """``ep`` with var/var_mean (and the ops named in ``also``, by their core ATen decomposition)
    decomposed, and how many of each were found (``{}`` when none)."""
    table = qnn_decompositions()
    for name in also:
        op, fn = _core_decomposition(name)
        table[op] = fn
    counts = {str(op): _count(ep, {op}) for op in table}
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return ep, {}
    out = ep.run_decompositions(table)
    log.info("QNN decompositions: %s", counts)
    return out, counts
