"""DiT blocks with AdaLN-modulated LayerNorm, and the timestep / text embeddings feeding them.

A block is Wan-style: the shared timestep projection gives six (shift, scale, gate) vectors, and
each block adds its own learned bias table to them. That keeps per-block modulation cheap
(no dim x 6*dim matrix per block) and, for a fixed step schedule, foldable into constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import DiTConfig
from .linear_attention import LinConvHybridAttention
from .softmax_attention import CrossAttention, SelfAttention


@dataclass(frozen=True)
class Resolution:
    """Token grid (t, h, w) and its RoPE cos/sin tables, for one branch resolution."""

    grid: tuple[int, int, int]
    rope: tuple[torch.Tensor, torch.Tensor]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard sinusoidal features of t * 1000 (flow time in [0, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t (B, F) -> (temb (B, F, dim), modulation base (B, F, 6, dim))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))
        e = self.proj(temb)
        return temb, e.unflatten(-1, (6, -1))


class TextEmbedding(nn.Module):
    """Projects text-encoder tokens to the DiT width (a sensitive layer: kept 8-bit on device)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.net(context)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    """x (B, N, C) with per-frame shift/scale (B, F, C): broadcast over the tokens of each frame."""
    b, n, c = x.shape
    x4 = x.view(b, frames, n // frames, c)
    return (x4 * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, c)


def gated(x: torch.Tensor, gate: torch.Tensor, frames: int) -> torch.Tensor:
    b, n, c = x.shape
    return (x.view(b, frames, n // frames, c) * gate[:, :, None]).view(b, n, c)


class DiTBlock(nn.Module):
    """norm -> self-attention (LCHA, SSA or dense) -> cross-attention -> norm -> GELU FFN."""

    def __init__(self, cfg: DiTConfig, kind: str):
        super().__init__()
        if kind not in ("L", "S", "F"):
            raise ValueError(f"unknown block kind {kind!r}")
        self.kind = kind
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = LinConvHybridAttention(cfg) if kind == "L" else SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, cfg.dim) / cfg.dim**0.5)

    def _mods(self, e: torch.Tensor):
        return (e + self.modulation).unbind(dim=2)

    def _finish(self, x, attn_out, gate_msa, e_rest, context, frames):
        shift_mlp, scale_mlp, gate_mlp = e_rest
        x = x + gated(attn_out, gate_msa, frames)
        x = x + self.cross(self.norm3(x), context)
        h = self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp, frames))
        return x + gated(h, gate_mlp, frames)

    def forward(self, x, e, context, res: Resolution, chunk_frames: int | None, window: int | None):
        shift, scale, gate, *rest = self._mods(e)
        frames = res.grid[0]
        a = self.attn(modulate(self.norm1(x), shift, scale, frames), res.grid, res.rope, chunk_frames, window)
        return self._finish(x, a, gate, rest, context, frames)

    def step(self, x, e, context, res: Resolution, cache: dict[str, torch.Tensor], key_mask: torch.Tensor):
        shift, scale, gate, *rest = self._mods(e)
        frames = res.grid[0]
        h = modulate(self.norm1(x), shift, scale, frames)
        if self.kind == "L":
            a, entries = self.attn.step(h, res.grid, res.rope, cache)
        else:
            # per-slot -> per-key mask as a view (expand + reshape), not repeat_interleave, which
            # quantizers and NPU compilers leave unannotated
            per_slot = cache["k"].shape[2] // key_mask.shape[0]
            mask = key_mask[:, None].expand(-1, per_slot).reshape(-1)
            a, entries = self.attn.step(h, res.grid, res.rope, cache, mask)
        return self._finish(x, a, gate, rest, context, frames), entries

    def cache_shapes(self, batch: int, grid: tuple[int, int, int], window: int) -> dict[str, tuple]:
        return self.attn.cache_shapes(batch, grid, window)
