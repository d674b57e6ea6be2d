"""Binary routers with exactly k LCHA groups: Gumbel top-k with a straight-through estimator.

The supplement trains m_n by Gumbel-softmax + STE and fixes the count k of LCHA groups. Independent
per-group Gumbel draws do not keep k (200 draws gave 2 to 6 LCHA groups of 6), so the draw here is
a Gumbel top-k over the middle groups' scores: the forward value is the hard top-k (exactly k ones,
m_1 = m_M = 1 prepended and appended), the backward value is the gradient of a sigmoid relaxation
around the threshold between the k-th and (k+1)-th perturbed score.

The score of group n is ``logits[n, 0] - logits[n, 1]`` of the model's own ``SandwichRouters``
(L vs S), so the routed checkpoint keeps its routers where ``S2DiT(search=True)`` has them.
"""

from __future__ import annotations

import torch

from ..topk import topk_ste


def group_scores(logits: torch.Tensor) -> torch.Tensor:
    """(M, 2) router logits -> (M - 2,) L-vs-S scores of the middle groups."""
    return logits[1:-1, 0] - logits[1:-1, 1]


def sample_fixed_k(logits: torch.Tensor, k: int, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """(M,) router values with m_1 = m_M = 1 and exactly k ones among the middle groups."""
    scores = group_scores(logits)
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k={k} LCHA groups does not fit {scores.numel()} middle groups")
    one = logits.new_ones(1)
    return torch.cat([one, topk_ste(scores, k, tau, generator), one])


def layout_routers(layout: str, like: torch.Tensor) -> torch.Tensor:
    """Constant router values of a fixed layout (for scoring a layout with the routed model)."""
    return torch.tensor([0.0 if c == "S" else 1.0 for c in layout], dtype=like.dtype, device=like.device)
