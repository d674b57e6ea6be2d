"""Efficient causal video decoder of S2DiT: latent (16, t, h, w) -> RGB (3, 4t, 8h, 8w).

Replaces the heavy Wan VAE decoder on the phone with narrow causal 3D convolutions, per-frame
GroupNorm and Hardswish. Every temporal operation only looks at the past, so a stream of latent
chunks decodes chunk by chunk with an explicit cache (the last kt-1 input frames of every
causal conv) and gives exactly the frames a one-shot decode of the whole sequence gives. The cache
is a flat list of fixed-shape tensors so the per-chunk step exports with ``torch.export`` (and
from there to Core ML / ExecuTorch / ONNX) as a pure function ``(z, cache) -> (video, cache)``.
All intermediate tensors are at most 5-D (Core ML / ANE limit) and no layer transposes a large
activation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR, DecoderConfig

logger = logging.getLogger(__name__)

_States = list[torch.Tensor]  # the cache entries one layer reads and returns, in order

__all__ = [
    "CausalConv3d",
    "FrameGroupNorm",
    "ResBlock",
    "TemporalUpsample",
    "SpatialUpsample",
    "EfficientDecoder",
]

# Sizes live in the model cards (registry.py); DecoderConfig() is the ~14M mobile decoder.


class CausalConv3d(nn.Module):
    """Conv3d padded only on the past in time ("same" in space), state passed explicitly.

    ``forward(x, past)`` prepends ``past`` (the previous kt-1 input frames, zeros at stream start)
    instead of zero padding, so chunked and one-shot decoding agree and no future frame is read.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = (3, 3, 3)):
        super().__init__()
        kt, kh, kw = kernel
        if kt < 2 or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"kernel {kernel}: need kt >= 2 (else it has no state) and odd kh, kw")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, padding=(0, kh // 2, kw // 2))

    @property
    def past_frames(self) -> int:
        return self.kernel[0] - 1

    def state_shape(self, batch: int, h: int, w: int) -> tuple[int, int, int, int, int]:
        return (batch, self.in_channels, self.past_frames, h, w)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xp = torch.cat([past, x], dim=2)
        return self.conv(xp), xp[:, :, -self.past_frames :]


class FrameGroupNorm(nn.Module):
    """GroupNorm with statistics per frame (as on (B*T, C, H, W)), so it never sees the future.

    Computed on a (B, G, C/G, T, H*W) view rather than by moving T into the batch: same numbers,
    no transpose of the activation, at most 5-D. Parameters are named like ``nn.GroupNorm``'s.
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-6):
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels={channels} not divisible by groups={groups}")
        self.groups, self.channels, self.eps = groups, channels, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        g = x.reshape(b, self.groups, c // self.groups, t, h * w)
        var, mean = torch.var_mean(g, dim=(2, 4), correction=0, keepdim=True)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        x = g.reshape(b, c, t, h, w)
        return x * self.weight.view(1, c, 1, 1, 1) + self.bias.view(1, c, 1, 1, 1)


class ResBlock(nn.Module):
    """norm -> hardswish -> causal conv -> norm -> hardswish -> causal conv, plus identity skip."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.norm2 = FrameGroupNorm(groups, channels)
        self.conv2 = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, states: _States) -> tuple[torch.Tensor, _States]:
        h, s1 = self.conv1(F.hardswish(self.norm1(x)), states[0])
        h, s2 = self.conv2(F.hardswish(self.norm2(h)), states[1])
        return x + h, [s1, s2]


class TemporalUpsample(nn.Module):
    """2x in time without future frames: causal conv to 2C channels, then channel-to-time.

    Output frames 2t and 2t+1 both come from input frames <= t. The reshape goes through a 5-D
    (B, 2, C, T, H*W) view instead of a 6-D one.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv = CausalConv3d(channels, 2 * channels, (3, 1, 1))

    def forward(self, x: torch.Tensor, states: _States) -> tuple[torch.Tensor, _States]:
        b, c, t, h, w = x.shape
        y, s = self.conv(x, states[0])
        y = y.reshape(b, 2, c, t, h * w).permute(0, 2, 3, 1, 4)  # (B, C, T, 2, HW)
        return y.reshape(b, c, 2 * t, h, w), [s]


class SpatialUpsample(nn.Module):
    """2x in space: nearest resize then a per-frame 3x3 conv (also changes the width).

    Chosen over conv-to-4C + pixel shuffle: same FLOPs, but no checkerboard artifacts at init,
    and nearest resize (done as 2-D on a (B, C*T, H, W) view) plus conv are first-class ops on
    every mobile backend, while pixel shuffle on 5-D video needs extra transposes. Stateless.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, states: _States) -> tuple[torch.Tensor, _States]:
        b, c, t, h, w = x.shape
        x = F.interpolate(x.reshape(b, c * t, h, w), scale_factor=2.0, mode="nearest")
        return self.conv(x.reshape(b, c, t, 2 * h, 2 * w)), []


class _Head(nn.Module):
    """norm -> hardswish -> per-frame 3x3 conv to RGB. No clamp: the pipeline clamps.

    Per-frame (stateless) because a causal head would cache two full-resolution frames for
    little gain; temporal mixing happens in the cheaper, lower-resolution layers.
    """

    def __init__(self, channels: int, groups: int, out_channels: int):
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels)
        self.conv = nn.Conv3d(channels, out_channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, states: _States) -> tuple[torch.Tensor, _States]:
        return self.conv(F.hardswish(self.norm(x))), []


class _Stem(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = CausalConv3d(in_channels, out_channels)

    def forward(self, x: torch.Tensor, states: _States) -> tuple[torch.Tensor, _States]:
        y, s = self.conv(x, states[0])
        return y, [s]


class EfficientDecoder(nn.Module):
    """Causal streaming decoder built from a :class:`DecoderConfig`.

    Layers run in a fixed sequence (stem, per stage: res blocks, optional temporal 2x, spatial 2x
    except after the last stage, head). The cache holds one tensor per :class:`CausalConv3d`, in
    that sequence; ``init_cache`` gives the zero cache with exactly the shapes ``forward`` returns.
    """

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.config = cfg = config
        ch = cfg.channels
        layers: list[nn.Module] = [_Stem(cfg.latent_channels, ch[0])]
        scales = [1]  # spatial upsample factor (vs the latent) at the input of each layer
        scale = 1
        for i, c in enumerate(ch):
            for _ in range(cfg.blocks_per_stage):
                layers.append(ResBlock(c, cfg.groups))
                scales.append(scale)
            for _ in range(cfg.temporal_up_at.count(i)):
                layers.append(TemporalUpsample(c))
                scales.append(scale)
            if i + 1 < len(ch):
                layers.append(SpatialUpsample(c, ch[i + 1]))
                scales.append(scale)
                scale *= 2
        layers.append(_Head(ch[-1], cfg.groups, cfg.out_channels))
        scales.append(scale)
        n_tup = sum(isinstance(m, TemporalUpsample) for m in layers)
        if scale != VAE_SPATIAL_FACTOR or 2**n_tup != VAE_TEMPORAL_FACTOR:
            raise ValueError(f"{cfg}: temporal_up_at must name stages 0..2 (4x time, 8x space)")
        self.layers = nn.ModuleList(layers)
        # (layer index, causal conv, spatial scale) for every cache entry, in forward order.
        self._convs = [
            (li, m, scales[li])
            for li, layer in enumerate(self.layers)
            for m in layer.modules()
            if isinstance(m, CausalConv3d)
        ]
        self._counts = [sum(1 for li, _, _ in self._convs if li == k) for k in range(len(layers))]
        logger.debug(
            "EfficientDecoder: %d params, %d cache tensors",
            sum(p.numel() for p in self.parameters()),
            len(self._convs),
        )

    @property
    def num_cache_tensors(self) -> int:
        return len(self._convs)

    def cache_shapes(self, batch: int, latent_h: int, latent_w: int) -> list[tuple[int, ...]]:
        return [conv.state_shape(batch, latent_h * s, latent_w * s) for _, conv, s in self._convs]

    def init_cache(
        self,
        batch: int,
        latent_h: int,
        latent_w: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor]:
        """Zero cache (stream start), one tensor per causal conv."""
        return [
            torch.zeros(shape, dtype=dtype, device=device)
            for shape in self.cache_shapes(batch, latent_h, latent_w)
        ]

    def forward(
        self, z: torch.Tensor, cache: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode latent frames ``z`` (B, 16, t, h, w) -> (video (B, 3, 4t, 8h, 8w), new cache)."""
        b, _, _, h, w = z.shape
        if cache is None:
            cache = self.init_cache(b, h, w, dtype=z.dtype, device=z.device)
        if len(cache) != len(self._convs):
            raise ValueError(f"cache has {len(cache)} tensors, decoder needs {len(self._convs)}")
        x, new_cache, k = z, [], 0
        for layer, n in zip(self.layers, self._counts):
            x, states = layer(x, list(cache[k : k + n]))
            new_cache.extend(states)
            k += n
        return x, new_cache

    def decode_full(self, z: torch.Tensor) -> torch.Tensor:
        """Whole latent sequence in one call from a zero cache (stream start)."""
        return self(z)[0]
