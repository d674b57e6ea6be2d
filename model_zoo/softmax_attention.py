"""Softmax attention modules: self-attention with 3D RoPE (SSA on the strided grid, or dense) and
cross-attention to text tokens.

Masks are additive finite negatives (not -inf): they survive fp16 and still underflow to an exact
0 after exp, so fp32 results equal hard masking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiTConfig
from .rope import apply_rope

MASK_VALUE = -3.0e4


def block_causal_mask(
    frames: int, tokens_per_frame: int, chunk_frames: int, window: int | None
) -> torch.Tensor:
    """(N, N) additive mask: a token sees its own chunk and up to ``window`` previous chunks."""
    chunk = torch.arange(frames).repeat_interleave(tokens_per_frame) // chunk_frames
    diff = chunk[:, None] - chunk[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff <= window
    return torch.where(allowed, 0.0, MASK_VALUE)


class HeadProjections(nn.Module):
    """q/k/v/o projections with per-head QK LayerNorm: the parameters every attention here shares."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        inner = cfg.inner_dim
        self.q = nn.Linear(cfg.dim, inner)
        self.k = nn.Linear(cfg.dim, inner)
        self.v = nn.Linear(cfg.dim, inner)
        self.o = nn.Linear(inner, cfg.dim)
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, H, N, d)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> (B, N, C)."""
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(HeadProjections):
    """Softmax self-attention with QK LayerNorm and 3D RoPE, windowed K/V cache for streaming.

    Used for SSA groups (on the spatially strided grid the sandwich hands it) and for dense
    ``F`` baseline groups (on the full grid).
    """

    def _qkv(self, x, rope):
        cos, sin = rope
        q = apply_rope(self.q_norm(self._heads(self.q(x))), cos, sin)
        k = apply_rope(self.k_norm(self._heads(self.k(x))), cos, sin)
        return q, k, self._heads(self.v(x))

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return self.o(self._merge(y))

    def forward(self, x, grid, rope, chunk_frames: int | None, window: int | None):
        q, k, v = self._qkv(x, rope)
        mask = None
        if chunk_frames is not None:
            t, gh, gw = grid
            mask = block_causal_mask(t, gh * gw, chunk_frames, window).to(x.device, x.dtype)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def step(self, x, grid, rope, cache: dict[str, torch.Tensor], key_mask: torch.Tensor):
        """Attend over [cached window | current chunk]; ``key_mask`` (window*n,) masks empty slots."""
        q, k, v = self._qkv(x, rope)
        keys = torch.cat([cache["k"], k], dim=2)
        values = torch.cat([cache["v"], v], dim=2)
        mask = torch.cat([key_mask.to(x.dtype), x.new_zeros(k.shape[2])])
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[None, :])
        return self._out(y), {"k": k, "v": v}

    def cache_shapes(self, batch: int, grid: tuple[int, int, int], window: int) -> dict[str, tuple]:
        n = grid[0] * grid[1] * grid[2]
        shape = (batch, self.num_heads, window * n, self.head_dim)
        return {"k": shape, "v": shape}


class CrossAttention(HeadProjections):
    """Video tokens attend to the projected text tokens (no mask, no RoPE)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.q_norm(self._heads(self.q(x)))
        k = self.k_norm(self._heads(self.k(context)))
        v = self._heads(self.v(context))
        return self.o(self._merge(F.scaled_dot_product_attention(q, k, v)))
