"""The causal video decoder without Conv3d or rank-5 tensors: frames as the batch axis.

Activations are (T, C, h, w) (batch 1). A causal (kt, kh, kw) Conv3d becomes kt conv2d taps over
time-shifted slices of [past | current] frames, summed; per-frame GroupNorm is a (T, G, C/G, h*w)
reduction; the channel-to-time upsample is a pure reshape (T, 2C, h, w) -> (2T, C, h, w). Weights
load from the stock decoder's state dict through pre-hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model_zoo import decoder as zoo
from .ane_layers import _reshape_hook
from .device_io import IOMap, feature_name


class AneCausalConv(nn.Module):
    def __init__(self, src: zoo.CausalConv3d):
        super().__init__()
        kt, kh, kw = src.kernel
        self.kt, self.pad = kt, (kh // 2, kw // 2)
        self.taps = nn.ParameterList(nn.Parameter(torch.zeros(src.out_channels, src.in_channels, kh, kw))
                                     for _ in range(kt))
        self.bias = nn.Parameter(torch.zeros(src.out_channels))
        self._register_load_state_dict_pre_hook(self._hook)

    def _hook(self, sd, prefix, *args, **kwargs):
        w = sd.pop(prefix + "conv.weight", None)
        if w is not None:
            for i in range(self.kt):
                sd[f"{prefix}taps.{i}"] = w[:, :, i].contiguous()
            sd[prefix + "bias"] = sd.pop(prefix + "conv.bias")

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, p = x.shape[0], self.kt - 1
        xp = torch.cat([past, x], dim=0)
        y = F.conv2d(xp[:f], self.taps[0], self.bias, padding=self.pad)
        for i in range(1, self.kt):
            y = y + F.conv2d(xp[i : i + f], self.taps[i], None, padding=self.pad)
        return y, xp[xp.shape[0] - p :]


class AneGroupNorm(nn.Module):
    def __init__(self, src: zoo.FrameGroupNorm):
        super().__init__()
        self.groups, self.eps = src.groups, src.eps
        self.weight = nn.Parameter(torch.ones(src.channels))
        self.bias = nn.Parameter(torch.zeros(src.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c, h, w = x.shape
        # (C/G, h, w) -> (C/G*h, w): same sums, and no axis of h*w elements (> 16384 at full res)
        g = x.reshape(t, self.groups, c // self.groups * h, w)
        mean = g.mean(dim=(2, 3), keepdim=True)
        zm = g - mean
        var = (zm * zm).mean(dim=(2, 3), keepdim=True)
        g = zm * torch.rsqrt(var + self.eps)
        return g.reshape(t, c, h, w) * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def hardswish(x: torch.Tensor) -> torch.Tensor:
    """x * relu6(x + 3) / 6 as clip + mul (coremltools lowers F.hardswish to thresholded_relu)."""
    return x * torch.clamp(x + 3.0, 0.0, 6.0) * (1.0 / 6.0)


class _Conv2dFrom3d(nn.Conv2d):
    def __init__(self, src: nn.Conv3d):
        super().__init__(src.in_channels, src.out_channels, src.kernel_size[1:], padding=src.padding[1:])
        self._register_load_state_dict_pre_hook(_reshape_hook("weight", lambda w: w[:, :, 0] if w.dim() == 5 else w))


class AneLayer(nn.Module):
    """One decoder layer (stem, res block, temporal / spatial upsample, head) in (T, C, h, w)."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.kind = type(src).__name__
        if self.kind == "_Stem":
            self.conv = AneCausalConv(src.conv)
        elif self.kind == "ResBlock":
            self.norm1, self.conv1 = AneGroupNorm(src.norm1), AneCausalConv(src.conv1)
            self.norm2, self.conv2 = AneGroupNorm(src.norm2), AneCausalConv(src.conv2)
        elif self.kind == "TemporalUpsample":
            self.conv = AneCausalConv(src.conv)
        elif self.kind == "SpatialUpsample":
            self.conv = _Conv2dFrom3d(src.conv)
        elif self.kind == "_Head":
            self.norm, self.conv = AneGroupNorm(src.norm), _Conv2dFrom3d(src.conv)
        else:
            raise NotImplementedError(f"decoder layer {self.kind} has no ANE rewrite")

    def forward(self, x, states):
        k = self.kind
        if k == "_Stem":
            y, s = self.conv(x, states[0])
            return y, [s]
        if k == "ResBlock":
            h, s1 = self.conv1(hardswish(self.norm1(x)), states[0])
            h, s2 = self.conv2(hardswish(self.norm2(h)), states[1])
            return x + h, [s1, s2]
        if k == "TemporalUpsample":
            y, s = self.conv(x, states[0])
            t, c2, h, w = y.shape
            return y.reshape(2 * t, c2 // 2, h, w), [s]
        if k == "SpatialUpsample":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), []
        return self.conv(hardswish(self.norm(x))), []


class AneDecoder(nn.Module):
    def __init__(self, src: zoo.EfficientDecoder):
        super().__init__()
        self.layers = nn.ModuleList(AneLayer(m) for m in src.layers)
        self.counts = list(src._counts)

    def forward(self, z, *cache):
        x, new, k = z, [], 0
        for layer, n in zip(self.layers, self.counts):
            x, states = layer(x, list(cache[k : k + n]))
            new.extend(states)
            k += n
        return (x, *new)


def _frames_first(name: str, shape: tuple[int, ...]) -> IOMap:
    b, c, t, h, w = shape
    if b != 1:
        raise NotImplementedError("the ANE decoder rewrite folds time into the batch axis; batch must be 1")
    return IOMap(name, feature_name(name), shape, (t, c, h, w), (0, 2, 1, 3, 4))


def rewrite_decoder_stage(stage) -> tuple[nn.Module, list[IOMap], list[IOMap]]:
    src = stage.module.decoder
    ane = AneDecoder(src).to(next(src.parameters()).dtype)
    ane.load_state_dict(src.state_dict(), strict=True)
    ins = [_frames_first(s.name, tuple(s.shape)) for s in stage.inputs]
    outs = [_frames_first(s.name, tuple(s.shape)) for s in stage.outputs]
    return ane.eval(), ins, outs
