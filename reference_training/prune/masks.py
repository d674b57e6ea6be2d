"""The three mask levels of Taming-DiT's tri-level pruning, their candidate sets, and how they act.

- Blocks (Eq. 3): y = Block(x) * m + x * (1 - m); a removed block is bypassed by the residual.
- Heads and FFN channels (Eq. 4): a linear layer's outputs times a 0/1 mask. A head's only way
  out of an attention is through the output projection (QK norms, RoPE, softmax / linear attention
  and the LCHA depthwise conv are all per head), so its mask sits on ``o``'s input features; an
  FFN channel's mask sits on the first FFN linear's output (GELU(0) = 0). Either way a 0 is exactly
  the pruned dense model (``dense.py``), which the tests check.

Candidate sets are group-wise (Sec. 4.2.1): each attention of each block is its own subspace with
exactly ``keep_heads`` heads, each block's FFN keeps exactly ``keep_ffn / ffn_group`` channel
groups, and the blocks keep ``keep_blocks`` in all with at least one per sandwich group (the
layout, and so every target's graph structure, stays). Inside each subspace the choice is learned:
scores start from weight-magnitude importance and are trained through Gumbel top-k + STE
(``topk.topk_ste``) on the pruning loss, so the kept set is the one that loses least information.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import InputError
from ...model_zoo.config import DiTConfig
from ..topk import gumbel_noise, topk_ste


class PruneTargetError(InputError):
    """A pruning target the model cannot take (every head of a block, a block count below one per group...)."""


@dataclass(frozen=True)
class PruneShape:
    """Kept units: blocks in all, heads per attention, FFN channels per block."""

    keep_blocks: int
    keep_heads: int
    keep_ffn: int
    ffn_group: int

    def as_dict(self) -> dict:
        return {"keep_blocks": self.keep_blocks, "keep_heads": self.keep_heads, "keep_ffn": self.keep_ffn,
                "ffn_group": self.ffn_group}


def check_shape(cfg: DiTConfig, keep_blocks: int | None, keep_heads: int | None, keep_ffn: int | None,
                ffn_group: int) -> PruneShape:
    """The target, defaulting to 'keep all', checked against the model before any work."""
    blocks = cfg.num_blocks if keep_blocks is None else keep_blocks
    heads = cfg.num_heads if keep_heads is None else keep_heads
    ffn = cfg.ffn_dim if keep_ffn is None else keep_ffn
    if cfg.ffn_dim % ffn_group:
        raise PruneTargetError(f"ffn_group={ffn_group} does not divide the model's ffn_dim={cfg.ffn_dim}")
    if heads < 1:
        raise PruneTargetError(f"keep_heads={heads} removes every head of every block's attention; keep at least 1 "
                               f"of {cfg.num_heads}")
    if heads > cfg.num_heads:
        raise PruneTargetError(f"keep_heads={heads} is more than the model's {cfg.num_heads} heads")
    if not cfg.num_groups <= blocks <= cfg.num_blocks:
        raise PruneTargetError(f"keep_blocks={blocks} must be in [{cfg.num_groups}, {cfg.num_blocks}]: at least one "
                               f"block per group of layout {cfg.layout!r}, at most all {cfg.num_blocks}")
    if not ffn_group <= ffn <= cfg.ffn_dim or ffn % ffn_group:
        raise PruneTargetError(f"keep_ffn={ffn} must be a multiple of ffn_group={ffn_group} in "
                               f"[{ffn_group}, {cfg.ffn_dim}]")
    if cfg.head_dim * heads % 2:
        raise PruneTargetError(f"keep_heads={heads} x head_dim {cfg.head_dim} must be even")
    return PruneShape(blocks, heads, ffn, ffn_group)


def block_list(dit) -> list[tuple[int, str, int, nn.Module]]:
    """(group, branch, index, block) of every block of a fixed-layout model, in run order."""
    out = []
    for n, g in enumerate(dit.sandwich.groups):
        for branch in ("high", "low"):
            if branch in g:
                out.extend((n, branch, j, blk) for j, blk in enumerate(g[branch]))
    return out


def _head_importance(attn, heads: int, head_dim: int) -> torch.Tensor:
    o = attn.o.weight.detach().float().reshape(attn.o.weight.shape[0], heads, head_dim)
    v = attn.v.weight.detach().float().reshape(heads, head_dim, -1)
    return o.norm(dim=(0, 2)) * v.norm(dim=(1, 2))


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-8) if x.shape[-1] > 1 else x * 0


class PruneMasks(nn.Module):
    """Learnable scores of every mask unit; ``sample`` draws exactly-k masks, ``hard`` the final ones."""

    def __init__(self, dit, shape: PruneShape):
        super().__init__()
        cfg, blocks = dit.cfg, block_list(dit)
        self.shape, self.heads, self.head_dim = shape, cfg.num_heads, cfg.head_dim
        self.groups = torch.tensor([n for n, *_ in blocks])
        ffn_units = cfg.ffn_dim // shape.ffn_group
        with torch.no_grad():
            self_imp = torch.stack([_head_importance(b.attn, cfg.num_heads, cfg.head_dim) for *_, b in blocks])
            cross_imp = torch.stack([_head_importance(b.cross, cfg.num_heads, cfg.head_dim) for *_, b in blocks])
            ffn_imp = torch.stack([
                (b.ffn[0].weight.detach().float().norm(dim=1) * b.ffn[2].weight.detach().float().norm(dim=0))
                .reshape(ffn_units, shape.ffn_group).sum(1) for *_, b in blocks])
        self.block_scores = nn.Parameter(torch.zeros(len(blocks)))
        self.head_scores = nn.Parameter(_standardize(self_imp))
        self.cross_scores = nn.Parameter(_standardize(cross_imp))
        self.ffn_scores = nn.Parameter(_standardize(ffn_imp))

    def _blocks(self, tau: float, generator: torch.Generator | None) -> torch.Tensor:
        pert = self.block_scores + gumbel_noise(self.block_scores.shape, generator, self.block_scores)
        forced = torch.zeros(len(pert), dtype=torch.bool)
        for g in self.groups.unique():  # the best block of each group always stays
            idx = torch.nonzero(self.groups == g).flatten()
            forced[idx[pert.detach()[idx].argmax()]] = True
        return topk_ste(pert, self.shape.keep_blocks, tau, None, forced)

    def sample(self, tau: float = 1.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masks with exactly the target counts (hard forward values, STE gradients to the scores)."""
        k_ffn = self.shape.keep_ffn // self.shape.ffn_group
        rows = lambda scores, k: torch.stack([topk_ste(s, k, tau, generator) for s in scores])  # noqa: E731
        ffn = rows(self.ffn_scores, k_ffn).repeat_interleave(self.shape.ffn_group, dim=1)
        return {"blocks": self._blocks(tau, generator), "heads": rows(self.head_scores, self.shape.keep_heads),
                "cross_heads": rows(self.cross_scores, self.shape.keep_heads), "ffn": ffn}

    @torch.no_grad()
    def hard(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().round() for k, v in self.sample(1.0, None).items()}  # STE adds +s-s rounding


def all_ones(dit, ffn_group: int = 1) -> dict[str, torch.Tensor]:
    """Masks that keep everything (pruning with them must be the identity)."""
    cfg, n = dit.cfg, len(block_list(dit))
    return {"blocks": torch.ones(n), "heads": torch.ones(n, cfg.num_heads), "cross_heads": torch.ones(n, cfg.num_heads),
            "ffn": torch.ones(n, cfg.ffn_dim)}


def check_masks(dit, masks: dict[str, torch.Tensor]) -> None:
    """Masks that leave a model behind: at least one head per attention and block per group."""
    blocks = block_list(dit)
    for key in ("heads", "cross_heads"):
        empty = [i for i, row in enumerate(masks[key]) if float(row.sum()) == 0]
        if empty:
            n, branch, j, _ = blocks[empty[0]]
            raise PruneTargetError(f"{key} mask removes every head of block groups.{n}.{branch}.{j}")
    for g in {n for n, *_ in blocks}:
        kept = sum(float(masks["blocks"][i]) for i, (n, *_) in enumerate(blocks) if n == g)
        if kept == 0:
            raise PruneTargetError(f"block mask removes every block of group {g}")


@contextlib.contextmanager
def masked(dit, masks: dict[str, torch.Tensor]):
    """Run ``dit`` with the masks applied through hooks (Eq. 3 and 4); removed on exit."""
    handles = []
    hd = dit.cfg.head_dim

    def head_hook(mask):
        return lambda _m, args: (args[0] * mask.repeat_interleave(hd).to(args[0].dtype),)

    def out_hook(mask):
        return lambda _m, _args, out: out * mask.to(out.dtype)

    def block_hook(m):
        return lambda _m, args, out: out * m + args[0] * (1 - m)

    try:
        for i, (*_, blk) in enumerate(block_list(dit)):
            handles.append(blk.attn.o.register_forward_pre_hook(head_hook(masks["heads"][i])))
            handles.append(blk.cross.o.register_forward_pre_hook(head_hook(masks["cross_heads"][i])))
            handles.append(blk.ffn[0].register_forward_hook(out_hook(masks["ffn"][i])))
            handles.append(blk.register_forward_hook(block_hook(masks["blocks"][i])))
        yield dit
    finally:
        for h in handles:
            h.remove()
