"""Neural-Engine-friendly building blocks in the channel-first (B, C, 1, S) layout.

Each layer keeps the parameter names of the float module it replaces and converts the stock
weights in a state-dict pre-hook (the Apple ml-stable-diffusion / ml-ane-transformers pattern), so
``ane_model.load_state_dict(float_model.state_dict())`` is all a rewrite needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _reshape_hook(name: str, shape_fn):
    """A load_state_dict pre-hook that reshapes ``prefix + name`` with ``shape_fn(tensor)``."""

    def hook(state_dict, prefix, *args, **kwargs):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = shape_fn(state_dict[key])

    return hook


class Conv1x1(nn.Conv2d):
    """``nn.Linear`` as a 1x1 conv2d on (B, C, H, W); loads a Linear's (out, in) weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, 1, bias=bias)
        self._register_load_state_dict_pre_hook(
            _reshape_hook("weight", lambda w: w[:, :, None, None] if w.dim() == 2 else w)
        )


class ChannelLayerNorm(nn.Module):
    """LayerNorm over ``axis`` (default the channel axis 1), written as mean/sub/mul/rsqrt.

    Same parameter names and numbers as ``nn.LayerNorm(C)`` applied to the last axis of the
    token-major tensor. ml-ane-transformers' LayerNormANE decomposes it the same way.
    """

    def __init__(self, channels: int, eps: float, axis: int = 1):
        super().__init__()
        self.eps, self.axis = eps, axis
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=self.axis, keepdim=True)
        zm = x - mean
        var = (zm * zm).mean(dim=self.axis, keepdim=True)
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return zm * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class PatchConv2d(nn.Conv2d):
    """A (1, p, p) Conv3d patch embedding as a conv2d on the frames stacked along height.

    With x (B, C, T, H, W) viewed as (B, C, T*H, W) and H divisible by p, no p x p window straddles
    two frames, so the output is the (B, D, T*H/p, W/p) token grid in frame-major order.
    """

    def __init__(self, in_channels: int, out_channels: int, patch: tuple[int, int, int]):
        if patch[0] != 1:
            raise NotImplementedError(f"temporal patch size {patch[0]} > 1 is not rewritten")
        super().__init__(in_channels, out_channels, patch[1:], stride=patch[1:])
        self._register_load_state_dict_pre_hook(
            _reshape_hook("weight", lambda w: w[:, :, 0] if w.dim() == 5 else w)
        )


class CausalDepthwiseTimeConv(nn.Module):
    """A depthwise (kt, kh, kw) Conv3d over [past kt-1 frames | F frames] without Conv3d.

    Frames are folded into channels ((B, C, F, h*w) -> (B, C*F, h, w), a pure reshape); output
    frame f of channel c is sum over taps of 2D convs of input frames f..f+kt-1, i.e. one grouped
    conv2d (groups=C) for the current frames and one for the cached past, with banded weights
    built from the stock Conv3d weight by the load hook (zeros off the band).
    """

    def __init__(self, channels: int, kernel: tuple[int, int, int], frames: int):
        super().__init__()
        kt, kh, kw = kernel
        if kt < 2:
            raise NotImplementedError("a local conv with kt < 2 has no time tail; not rewritten")
        self.channels, self.kernel, self.frames, self.past = channels, kernel, frames, kt - 1
        self.w_cur = nn.Parameter(torch.zeros(channels * frames, frames, kh, kw))
        self.w_past = nn.Parameter(torch.zeros(channels * frames, kt - 1, kh, kw))
        self.bias = nn.Parameter(torch.zeros(channels * frames))
        self._register_load_state_dict_pre_hook(self._from_conv3d)

    def _from_conv3d(self, state_dict, prefix, *args, **kwargs):
        w3 = state_dict.pop(prefix + "weight", None)
        b3 = state_dict.pop(prefix + "bias", None)
        if w3 is None:
            return
        kt, kh, kw = self.kernel
        c, f, p = self.channels, self.frames, self.past
        cur = w3.new_zeros(c, f, f, kh, kw)
        past = w3.new_zeros(c, f, p, kh, kw)
        for out_f in range(f):
            for j in range(p + f):  # padded input frame index
                tap = j - out_f
                if 0 <= tap < kt:
                    if j < p:
                        past[:, out_f, j] = w3[:, 0, tap]
                    else:
                        cur[:, out_f, j - p] = w3[:, 0, tap]
        state_dict[prefix + "w_cur"] = cur.reshape(c * f, f, kh, kw)
        state_dict[prefix + "w_past"] = past.reshape(c * f, p, kh, kw)
        state_dict[prefix + "bias"] = (b3 if b3 is not None else w3.new_zeros(c)).repeat_interleave(f)

    def forward(self, cur: torch.Tensor, past: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """cur (B, C, F, h*w), past (B, C, kt-1, h*w) -> (B, C, F, h*w)."""
        b = cur.shape[0]
        h, w = hw
        _, kh, kw = self.kernel
        pad = (kh // 2, kw // 2)
        c, f = self.channels, self.frames
        y = F.conv2d(cur.reshape(b, c * f, h, w), self.w_cur, self.bias, padding=pad, groups=c)
        y = y + F.conv2d(past.reshape(b, c * self.past, h, w), self.w_past, None, padding=pad, groups=c)
        return y.reshape(b, c, f, h * w)


def rotate_half(x: torch.Tensor, axis: int = 2) -> torch.Tensor:
    d = x.shape[axis] // 2
    a, b = x.narrow(axis, 0, d), x.narrow(axis, d, d)
    return torch.cat([-b, a], dim=axis)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, d, N) with cos/sin (1, 1, d, N): the rotate-half RoPE as two multiplies."""
    return x * cos + rotate_half(x, 2) * sin


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, 1, N) -> (B, H, d, N) (a pure reshape of channel-first memory)."""
    b, c, _, n = x.shape
    return x.reshape(b, heads, c // heads, n)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, d, n = x.shape
    return x.reshape(b, h * d, 1, n)


def per_head(fn, split: bool, *tensors: torch.Tensor) -> torch.Tensor:
    """Run ``fn`` on all heads batched along axis 1, or one head at a time (then concat)."""
    if not split:
        return fn(*tensors)
    heads = tensors[0].shape[1]
    return torch.cat([fn(*(t[:, i : i + 1] for t in tensors)) for i in range(heads)], dim=1)
