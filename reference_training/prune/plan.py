"""Sizing a pruning target on paper: parameters of a pruned shape, and the shape for a parameter budget.

Parameters are linear in the kept units (every block holds the same attention / FFN tensors), so
four meta-device builds give the exact per-block, per-head and per-FFN-channel counts and any
shape is priced without building it. For a budget, the shape minimises the largest weighted
pruning fraction, with Taming-DiT's priorities as weights: FFN is protected most, blocks next,
heads are pruned most aggressively (Sec. 4.2.1: "FFN contributes more significantly to performance
than attention heads"). The weights (1.5, 4/3, 1) make the seed's own result (FFN -25 %, blocks
28 -> 20, heads 32 -> 20) a balanced point.
"""

from __future__ import annotations

import dataclasses

import torch

from ...model_zoo.config import DiTConfig
from ...model_zoo.dit import S2DiT
from .masks import PruneShape, PruneTargetError, check_shape

WEIGHTS = {"blocks": 4 / 3, "heads": 1.0, "ffn": 1.5}


def _params(cfg: DiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in S2DiT(cfg).parameters())


def _spread(cfg: DiTConfig, keep_blocks: int) -> tuple[int, ...]:
    """Kept blocks per group for a count, removed evenly from the middle groups outwards (the plan's
    guess; the learned block masks decide which blocks go)."""
    per = [cfg.blocks_in(n) for n in range(cfg.num_groups)]
    order = sorted(range(cfg.num_groups), key=lambda n: abs(n - (cfg.num_groups - 1) / 2))
    drop, i = sum(per) - keep_blocks, 0
    while drop > 0:
        n = order[i % len(order)]
        if per[n] > 1:
            per[n] -= 1
            drop -= 1
        i += 1
    return tuple(per)


def pruned_config(cfg: DiTConfig, shape: PruneShape) -> DiTConfig:
    """The dense config of a shape (block spread as ``_spread`` guesses)."""
    return dataclasses.replace(cfg, num_heads=shape.keep_heads, attn_dim=shape.keep_heads * cfg.head_dim,
                               ffn_dim=shape.keep_ffn, group_blocks=_spread(cfg, shape.keep_blocks), search=False)


def shape_params(cfg: DiTConfig, shape: PruneShape) -> int:
    return _params(pruned_config(cfg, shape))


def fractions(cfg: DiTConfig, shape: PruneShape) -> dict[str, float]:
    return {"blocks": 1 - shape.keep_blocks / cfg.num_blocks, "heads": 1 - shape.keep_heads / cfg.num_heads,
            "ffn": 1 - shape.keep_ffn / cfg.ffn_dim}


def plan_shape(cfg: DiTConfig, target_params: int, ffn_group: int) -> tuple[PruneShape, dict]:
    """The shape with at most ``target_params`` DiT parameters that prunes least (weighted)."""
    full = PruneShape(cfg.num_blocks, cfg.num_heads, cfg.ffn_dim, ffn_group)
    check_shape(cfg, full.keep_blocks, full.keep_heads, full.keep_ffn, ffn_group)
    p_full = _params(pruned_config(cfg, full))
    # exact linear model: per block, per head (in every block), per FFN channel (in every block)
    per_head = p_full - _params(pruned_config(cfg, dataclasses.replace(full, keep_heads=cfg.num_heads - 1))) \
        if cfg.num_heads > 1 else 0
    per_ffn = (p_full - _params(pruned_config(cfg, dataclasses.replace(full, keep_ffn=cfg.ffn_dim - ffn_group)))) / ffn_group
    per_block = p_full - _params(pruned_config(cfg, dataclasses.replace(full, keep_blocks=cfg.num_blocks - 1))) \
        if cfg.num_blocks > cfg.num_groups else 0
    base = p_full - cfg.num_blocks * per_block
    smallest = base + cfg.num_groups * (per_block - (cfg.num_heads - 1) * per_head / cfg.num_blocks
                                        - (cfg.ffn_dim - ffn_group) * per_ffn / cfg.num_blocks)
    if target_params >= p_full:
        raise PruneTargetError(f"target_params={target_params:,} is not below the model's {p_full:,} DiT parameters")
    best = None
    for b in range(cfg.num_groups, cfg.num_blocks + 1):
        for h in range(1, cfg.num_heads + 1):
            # block params scale with kept heads / FFN: block(h, f) = per_block - (H-h)*ph' - (F-f)*pf'
            ph, pf = per_head / cfg.num_blocks, per_ffn / cfg.num_blocks
            fixed = base + b * (per_block - (cfg.num_heads - h) * ph - cfg.ffn_dim * pf)
            room = (target_params - fixed) / (b * pf) if pf else cfg.ffn_dim
            f = min(cfg.ffn_dim, int(room // ffn_group) * ffn_group)
            if f < ffn_group:
                continue
            shape = PruneShape(b, h, f, ffn_group)
            fr = fractions(cfg, shape)
            key = (max(WEIGHTS[k] * v for k, v in fr.items()), -(fixed + b * f * pf))
            if best is None or key < best[0]:
                best = (key, shape)
    if best is None:
        raise PruneTargetError(f"target_params={target_params:,} is below the smallest shape of this model "
                               f"(one block per group, one head, {ffn_group} FFN channels: about {int(smallest):,})")
    shape = best[1]
    return shape, {"params": shape_params(cfg, shape), "fractions": fractions(cfg, shape),
                   "full_params": p_full, "weights": WEIGHTS}
