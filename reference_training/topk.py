"""Exactly-k binary masks from learnable scores: Gumbel top-k with a straight-through estimator.

Shared by the sandwich routers (k LCHA groups) and the pruning masks (k kept heads, FFN channel
groups or blocks). The forward value is the hard top-k of the Gumbel-perturbed scores (exactly k
ones); the backward value is the gradient of a sigmoid relaxation around the threshold halfway
between the k-th and (k+1)-th perturbed score, so a unit gains score when keeping it lowers the loss.
"""

from __future__ import annotations

import torch


def gumbel_noise(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    if generator is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    u = torch.rand(shape, generator=generator).clamp(1e-9, 1 - 1e-9)
    return (-torch.log(-torch.log(u))).to(like)


def topk_ste(scores: torch.Tensor, k: int, tau: float, generator: torch.Generator | None = None,
             forced: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) 0/1 mask with exactly k ones (hard forward, soft backward); ``forced`` (n,) bool units
    are kept first (they count towards k)."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} units")
    pert = scores + gumbel_noise(scores.shape, generator, scores)
    rank_key = pert.detach().clone()
    if forced is not None:
        rank_key[forced] = float("inf")
    order = torch.argsort(rank_key, descending=True)
    hard = torch.zeros_like(scores)
    hard[order[:k]] = 1.0
    if 0 < k < n:
        vals = pert.detach()[order]
        threshold = 0.5 * (vals[k - 1] + vals[k])
        soft = torch.sigmoid((pert - threshold) / tau)
        return hard + soft - soft.detach()
    return hard + 0 * scores  # one mask has this k: nothing to learn
