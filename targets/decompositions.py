"""ATen overloads some converters have no lowering for, rewritten into ones every target takes.

``var_mean`` / ``var`` come from GroupNorm (the decoder). coremltools 9.0 and coreai-torch 0.4.3
have no lowering for ``var_mean.correction``, ExecuTorch's QNN backend has no builder for it, and
torch's own decomposition ends in ``prims.var``, which none of them lowers. So it is written once
here as two-pass mean / subtract / square / mean: exact in real arithmetic and, unlike
E[x^2] - E[x]^2, it does not cancel in fp16 or 8-bit activations. The two ``where`` scalar
overloads are coremltools' gap only (coreai-torch lowers them itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _dims(x: torch.Tensor, dim: int | Sequence[int] | None) -> list[int]:
    if dim is None:
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % x.dim() for d in dims) if dims else list(range(x.dim()))


def var_and_mean(x: torch.Tensor, dim, correction, keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dims = _dims(x, dim)
    mean = torch.mean(x, dim=dims, keepdim=True)
    centered = x - mean
    var = torch.mean(centered * centered, dim=dims, keepdim=keepdim)
    c = 1 if correction is None else float(correction)
    if c:
        n = math.prod(x.shape[d] for d in dims)
        var = var * (n / max(n - c, 0.0)) if n > c else var * float("inf")
    if not keepdim:
        mean = torch.squeeze(mean, dims)
    return var, mean


def var_mean_correction(x, dim=None, *, correction=None, keepdim=False):
    return var_and_mean(x, dim, correction, keepdim)


def var_correction(x, dim=None, *, correction=None, keepdim=False):
    return var_and_mean(x, dim, correction, keepdim)[0]


def where_scalar_other(cond, x, other):
    return torch.where(cond, x, torch.full_like(x, other))


def where_scalar_self(cond, x, other):
    return torch.where(cond, torch.full_like(other, x), other)


VARIANCE = {torch.ops.aten.var_mean.correction: var_mean_correction,
            torch.ops.aten.var.correction: var_correction}
WHERE_SCALARS = {torch.ops.aten.where.ScalarOther: where_scalar_other,
                 torch.ops.aten.where.ScalarSelf: where_scalar_self}
