"""Module swaps that make a stage lowerable by XNNPACK without changing its numbers.

XNNPACK has no 3-D convolution, and ExecuTorch's portable ``convolution.out`` kernel (the CPU
fallback) rejects 5-D inputs, so every ``nn.Conv3d`` becomes ``kt`` conv2d taps over frames moved
into the batch axis, summed. The swap works on a deep copy; the float stage is never modified.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch import nn


class Conv3dAsConv2d(nn.Module):
    """``nn.Conv3d`` (any stride, zero padding, groups; dilation 1) as a sum of per-tap conv2d."""

    def __init__(self, src: nn.Conv3d):
        super().__init__()
        if tuple(src.dilation) != (1, 1, 1):
            raise ValueError(f"Conv3d with dilation {src.dilation} is not supported by the XNNPACK swap")
        if src.padding_mode != "zeros" or isinstance(src.padding, str):
            raise ValueError(f"Conv3d padding {src.padding!r}/{src.padding_mode} is not supported by the swap")
        self.kt = src.kernel_size[0]
        self.stride_t, self.stride_hw = src.stride[0], tuple(src.stride[1:])
        self.pad_t, self.pad_hw = src.padding[0], tuple(src.padding[1:])
        self.groups = src.groups
        w = src.weight.detach()
        self.taps = nn.ParameterList(nn.Parameter(w[:, :, i].contiguous(), requires_grad=False)
                                     for i in range(self.kt))
        self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.pad_t:
            x = F.pad(x, (0, 0, 0, 0, self.pad_t, self.pad_t))
            t = t + 2 * self.pad_t
        t_out = (t - self.kt) // self.stride_t + 1
        frames = x.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)
        y = None
        for i, tap in enumerate(self.taps):
            sel = frames[:, i: i + self.stride_t * (t_out - 1) + 1: self.stride_t]
            z = F.conv2d(sel.reshape(b * t_out, c, h, w), tap, self.bias if i == 0 else None,
                         self.stride_hw, self.pad_hw, 1, self.groups)
            y = z if y is None else y + z
        ho, wo = y.shape[-2:]
        return y.reshape(b, t_out, -1, ho, wo).permute(0, 2, 1, 3, 4)


def swap_conv3d(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``module`` (weights shared, not copied) with every Conv3d replaced; returns (copy, count)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    out = copy.deepcopy(module, memo)
    return out, replace_modules(out, nn.Conv3d, Conv3dAsConv2d)


def replace_modules(module: nn.Module, kind: type[nn.Module], make) -> int:
    """Replace every ``kind`` submodule of ``module`` in place by ``make(child)``; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                count += 1
    return count


class LinearLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last axis with its two means as 1-column linears (XNNPACK has no
    layer-norm op; a mean over the channel axis as a GEMM with a constant 1/C column is delegated)."""

    def __init__(self, src: nn.LayerNorm):
        super().__init__()
        if len(src.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {src.normalized_shape}: only the last axis is supported")
        c = src.normalized_shape[0]
        self.eps = src.eps
        self.register_buffer("avg", torch.full((1, c), 1.0 / c), persistent=False)
        self.weight = None if src.weight is None else nn.Parameter(src.weight.detach().clone(), requires_grad=False)
        self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - F.linear(x, self.avg)
        y = xc * torch.rsqrt(F.linear(xc * xc, self.avg) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def swap_layer_norm(module: nn.Module) -> int:
    """Replace every ``nn.LayerNorm`` in place (call on a copy); returns how many."""
    return replace_modules(module, nn.LayerNorm, LinearLayerNorm)


def sdpa_as_matmuls(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Decomposition of ``aten.scaled_dot_product_attention`` into bmm + softmax + bmm.

    The stock decomposition guards fully masked rows with any/where/logical_not on the portable CPU
    kernels; every mask here is finite (additive) or has a visible key per row, so plain math is exact.
    """
    if dropout_p:
        raise ValueError("dropout in an inference graph")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        n, m = q.shape[-2], k.shape[-2]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def var_mean_explicit(x, dim=None, *, correction=1, keepdim=False, unbiased=None):
    """``torch.var_mean`` as two means (``aten.var_mean.correction`` is not core ATen: to_edge rejects it)."""
    if unbiased is not None:
        correction = 1 if unbiased else 0
    dims = tuple(range(x.dim())) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    n = 1
    for d in dims:
        n *= x.shape[d]
    mean = x.mean(dim=dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=dims, keepdim=keepdim)
    if correction:
        var = var * (n / max(n - correction, 1))
    return var, (mean if keepdim else mean.squeeze(dims))


class SdpaAsMatmuls(TorchFunctionMode):
    """While tracing, ``F.scaled_dot_product_attention`` calls become :func:`sdpa_as_matmuls` and
    ``torch.var_mean`` becomes :func:`var_mean_explicit`.

    A torch-function mode is scoped to the ``with`` block and this thread, so the float model is
    untouched and no extra decomposition pass over the exported graph is needed (each pass over a
    DiT step graph costs tens of seconds).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa_as_matmuls(*args, **kwargs)
        if func is torch.var_mean:
            return var_mean_explicit(*args, **kwargs)
        return func(*args, **kwargs)


def export_for_xnnpack(module: nn.Module, example: tuple):
    """``torch.export`` (non-strict) with attention traced as plain matmul/softmax ops."""
    with torch.no_grad(), SdpaAsMatmuls():
        return torch.export.export(module, example, strict=False)
