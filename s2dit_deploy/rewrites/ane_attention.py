"""LCHA, SSA and cross-attention re-authored for the Neural Engine.

All activations are channel-first: tokens (B, C, 1, N), heads (B, H, d, N) (a reshape of the same
memory). No fused SDPA: scores are computed as keys^T @ q (M x n, keys on axis 2) so the softmax
and both matmuls need no transpose of the score matrix; masks are additive finite negatives.
With ``split_heads`` every head is its own chain of ops (Apple's recommendation for the ANE).

fp16 safety of the linear attention: the key features and values are each scaled by n^-1/2
(n = tokens per chunk) before any sum over tokens, so the per-chunk state kv/n and ksum/n and the
readout denominator stay O(1) instead of O(n); the eps is rescaled the same way. Caches carry the
scaled state; the host adapter (``device_io``) converts to and from the float contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ane_layers import (
    CausalDepthwiseTimeConv,
    ChannelLayerNorm,
    Conv1x1,
    apply_rope,
    from_heads,
    per_head,
    to_heads,
)

FP16_MIN_NORMAL = 2.0**-14


class _Projections(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.inner_dim
        self.q = Conv1x1(cfg.dim, inner)
        self.k = Conv1x1(cfg.dim, inner)
        self.v = Conv1x1(cfg.dim, inner)
        self.o = Conv1x1(inner, cfg.dim)
        self.q_norm = ChannelLayerNorm(cfg.head_dim, cfg.norm_eps, axis=2)
        self.k_norm = ChannelLayerNorm(cfg.head_dim, cfg.norm_eps, axis=2)


class AneLCHA(_Projections):
    """LinConv Hybrid Attention, one chunk against the (scaled, transposed) per-chunk states."""

    def __init__(self, cfg, grid: tuple[int, int, int], split_heads: bool, eps_floor: float):
        super().__init__(cfg)
        self.grid, self.split = grid, split_heads
        self.tokens = grid[0] * grid[1] * grid[2]
        self.eps = max(cfg.linear_attn_eps / self.tokens, eps_floor)
        self.local = CausalDepthwiseTimeConv(cfg.inner_dim, cfg.conv_kernel, grid[0])

    def step(self, x, rope, cache: dict[str, torch.Tensor]):
        b, c, _, n = x.shape
        h, d = self.num_heads, self.head_dim
        cos, sin = rope
        s = self.tokens**-0.5
        q = F.relu(self.q_norm(to_heads(self.q(x), h)))
        k = F.relu(self.k_norm(to_heads(self.k(x), h))) * s
        v_tok = self.v(x)
        v = to_heads(v_tok, h) * s
        q_rot = apply_rope(q, cos, sin)
        k_rot_t = apply_rope(k, cos, sin).transpose(2, 3)  # (B, H, N, d)
        kv_cur = per_head(torch.matmul, self.split, v, k_rot_t)  # (B, H, d_v, d_k) = kv^T / n
        ksum_cur = k.sum(dim=3, keepdim=True) * s  # (B, H, d, 1) = ksum / n
        kv = kv_cur + cache["kv"].sum(dim=0).reshape(b, h, d, d)
        ksum = ksum_cur + cache["ksum"].sum(dim=0).reshape(b, h, d, 1)
        eps = self.eps

        def readout(kv, q_rot, q, ksum):
            num = torch.matmul(kv, q_rot)
            den = (q * ksum).sum(dim=2, keepdim=True) + eps
            return num / den

        glob = per_head(readout, self.split, kv, q_rot, q, ksum)
        t, gh, gw = self.grid
        inner = v_tok.shape[1]  # h * d: narrower than c after head pruning
        cur = v_tok.reshape(b, inner, t, gh * gw)
        local = self.local(cur, cache["vtail"], (gh, gw)).reshape(b, inner, 1, n)
        out = self.o(from_heads(glob) + local)
        p = self.local.past
        tail = cur[:, :, t - p :] if t >= p else torch.cat([cache["vtail"], cur], dim=2)[:, :, -p:]
        return out, {"kv": kv_cur, "ksum": ksum_cur.reshape(b, h, d), "vtail": tail}


def _attend(keys_t, q, values, mask):
    """keys_t (B,h,M,d), q (B,h,d,n) pre-scaled, values (B,h,d,M), mask (1,1,M,1) or None."""
    scores = torch.matmul(keys_t, q)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(values, torch.softmax(scores, dim=2))


class AneSelfAttention(_Projections):
    """Softmax self-attention (SSA / dense) over [cached window | chunk]; K cached token-major."""

    def __init__(self, cfg, split_heads: bool):
        super().__init__(cfg)
        self.split = split_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def step(self, x, rope, cache: dict[str, torch.Tensor], mask: torch.Tensor):
        h = self.num_heads
        cos, sin = rope
        q = apply_rope(self.q_norm(to_heads(self.q(x), h)), cos, sin) * self.scale
        k_t = apply_rope(self.k_norm(to_heads(self.k(x), h)), cos, sin).transpose(2, 3)
        v = to_heads(self.v(x), h)
        keys_t = torch.cat([cache["k"], k_t], dim=2)
        values = torch.cat([cache["v"], v], dim=3)
        y = per_head(lambda kt, qq, vv: _attend(kt, qq, vv, mask), self.split, keys_t, q, values)
        return self.o(from_heads(y)), {"k": k_t, "v": v}


class AneCrossAttention(_Projections):
    """Video tokens (B, C, 1, N) attend to projected text tokens (B, C, 1, L)."""

    def __init__(self, cfg, split_heads: bool):
        super().__init__(cfg)
        self.split = split_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        q = self.q_norm(to_heads(self.q(x), h)) * self.scale
        k_t = self.k_norm(to_heads(self.k(ctx), h)).transpose(2, 3)
        v = to_heads(self.v(ctx), h)
        y = per_head(lambda kt, qq, vv: _attend(kt, qq, vv, None), self.split, k_t, q, v)
        return self.o(from_heads(y))
