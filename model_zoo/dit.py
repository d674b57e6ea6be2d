"""S2DiT: patch embedding, timestep/text embeddings, the sandwich of LCHA/SSA groups, AdaLN head.

Two entry points share every weight:
- ``forward``: a whole latent sequence; bidirectional, or block-causal over chunks with a window
  (the training-time view of streaming).
- ``step``: one chunk against fixed-shape caches (the deployment stage ``dit_step``); ``push_cache``
  commits a chunk's entries. Streaming chunk by chunk equals ``forward`` with the same window.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import Resolution, TextEmbedding, TimestepEmbedding, modulate
from .cache import VALID_KEY, push_entries, slot_mask
from .config import DiTConfig, StreamConfig
from .rope import rope_cos_sin
from .sandwich import Sandwich
from .softmax_attention import MASK_VALUE


class S2DiT(nn.Module):
    """Sandwich Diffusion Transformer predicting the flow velocity eps - x0 of a latent video."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        c, p = cfg.latent_channels, cfg.patch_size
        self.patch_embed = nn.Conv3d(c, cfg.dim, p, stride=p)
        self.text_embedding = TextEmbedding(cfg)
        self.time_embedding = TimestepEmbedding(cfg)
        self.sandwich = Sandwich(cfg)
        self.head_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head_modulation = nn.Parameter(torch.randn(1, 1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, c * math.prod(p))

    # ---- shared pieces ------------------------------------------------------------------------
    def resolutions(self, grid, frame_offset=0, dtype=torch.float32) -> tuple[Resolution, Resolution]:
        """High- and low-resolution grids with their RoPE tables (time offset for streaming)."""
        cfg, s, dev = self.cfg, self.cfg.ssa_stride, self.head.weight.device
        lo_grid = (grid[0], grid[1] // s, grid[2] // s)
        hi = Resolution(grid, rope_cos_sin(grid, cfg.head_dim, cfg.rope_theta, frame_offset, dtype, dev))
        lo = Resolution(lo_grid, rope_cos_sin(lo_grid, cfg.head_dim, cfg.rope_theta, frame_offset, dtype, dev))
        return hi, lo

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        _, _, f, h, w = x.shape
        grid = self.cfg.token_grid(f, h, w)
        return self.patch_embed(x).flatten(2).transpose(1, 2), grid

    def time(self, t: torch.Tensor | float, batch: int, frames: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timestep embeddings from t given as a scalar, (B,) or (B, F)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.head.weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1:
            t = t[:, None].expand(batch, frames)
        temb, e = self.time_embedding(t)
        return temb.to(dtype), e.to(dtype)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = tokens.shape[0]
        t, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.latent_channels
        x = tokens.view(b, t, h, w, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, t * pt, h * ph, w * pw)

    def final(self, y, temb, grid) -> torch.Tensor:
        shift, scale = (temb[:, :, None] + self.head_modulation).unbind(dim=2)
        return self.unpatchify(self.head(modulate(self.head_norm(y), shift, scale, grid[0])), grid)

    # ---- full sequence ------------------------------------------------------------------------
    def forward(self, x, t, context, chunk_frames: int | None = None, window: int | None = None,
                routers: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 16, F, H, W), t scalar/(B,)/(B, F), context (B, L, text_dim) -> velocity like x."""
        y, temb, grid = self.features(x, t, context, chunk_frames, window, routers)
        return self.final(y, temb, grid)

    def features(self, x, t, context, chunk_frames: int | None = None, window: int | None = None,
                 routers: torch.Tensor | None = None):
        """The sandwich's output tokens y-hat (Algorithm 1's output, what Eq. 10 distills), the
        timestep embedding and the token grid: ``forward`` without the AdaLN head."""
        y, grid = self.embed(x)
        temb, e = self.time(t, x.shape[0], grid[0], y.dtype)
        hi, lo = self.resolutions(grid, 0, y.dtype)
        ctx = self.text_embedding(context)
        return self.sandwich(y, e, ctx, hi, lo, chunk_frames, window, routers), temb, grid

    # ---- streaming ----------------------------------------------------------------------------
    def step(self, x, t, context, cache: dict[str, torch.Tensor], frame_offset: int | torch.Tensor = 0,
             rope: tuple[torch.Tensor, ...] | None = None):
        """One chunk (B, 16, f, H, W) -> (velocity, this chunk's cache entries).

        ``rope`` = (hi_cos, hi_sin, lo_cos, lo_sin) tables computed by the host (exact fp32 angles
        for any stream position); without it they are computed from ``frame_offset``.
        """
        y, grid = self.embed(x)
        temb, e = self.time(t, x.shape[0], grid[0], y.dtype)
        hi, lo = self.resolutions(grid, frame_offset, y.dtype)
        if rope is not None:
            hi, lo = Resolution(hi.grid, tuple(rope[:2])), Resolution(lo.grid, tuple(rope[2:]))
        ctx = self.text_embedding(context)
        key_mask = slot_mask(cache[VALID_KEY], MASK_VALUE)
        y, entries = self.sandwich.step(y, e, ctx, hi, lo, cache, key_mask)
        return self.final(y, temb, grid), entries

    def cache_shapes(self, batch: int, latent_hw: tuple[int, int], stream: StreamConfig) -> dict[str, tuple]:
        grid = self.cfg.token_grid(stream.chunk_frames, *latent_hw)
        s = self.cfg.ssa_stride
        lo = (grid[0], grid[1] // s, grid[2] // s)
        shapes: dict[str, tuple] = {}
        for prefix, blk, low in self.sandwich.block_items():
            for k, shape in blk.cache_shapes(batch, lo if low else grid, stream.window_chunks).items():
                shapes[f"{prefix}.{k}"] = shape
        shapes[VALID_KEY] = (stream.window_chunks,)
        return shapes

    def init_cache(self, batch: int, latent_hw: tuple[int, int], stream: StreamConfig,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Empty cache (zeros; no valid slots) for the start of a stream."""
        device = self.head.weight.device
        shapes = self.cache_shapes(batch, latent_hw, stream)
        return {k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()}

    @staticmethod
    def push_cache(cache: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return push_entries(cache, entries)
