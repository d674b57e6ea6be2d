"""QNN-friendly, numerically equivalent module swaps applied to a copy of a stage module.

- HTP has no depthwise Conv3d (ExecuTorch's QNN conv builder asserts "DepthWise only supports
  Conv2d"), so the LCHA local conv, a causal depthwise (kt, kh, kw) Conv3d, becomes kt depthwise
  conv2d taps over the frames (frames folded into the batch axis) summed together.
- HTP tensors have rank <= 5 ("has incorrect Rank 8" on the DiT head's unpatchify), so unpatchify
  becomes a rank-5 reshape + ``pixel_shuffle``.
- Timestep features move to the host (like the RoPE tables): ``sin/cos(1000 t f)`` is
  ill-conditioned in fp16 (t in fp16 carries a 5e-4 relative error, i.e. up to 0.5 rad of phase),
  so the graph takes the fp32 sinusoidal features instead of ``t``; the runner computes them from
  the contract's ``t`` before each call. The stage's named I/O contract is unchanged.
- Softmax attention is written out (matmul, softmax, matmul) instead of
  ``scaled_dot_product_attention``, whose masked decomposition (``_safe_softmax``) brings boolean
  ops no quantizer annotates; and the streaming step masks empty cache slots by multiplying the
  probabilities (then renormalising) instead of adding -3e4 to the scores, which in an 8-bit
  activation range would leave no resolution for the real scores.
"""

from __future__ import annotations

import copy
import logging
import types
from typing import Any

import torch
from torch import nn

from ..explicit_attention import explicit_attention

log = logging.getLogger(__name__)


class DepthwiseConv3dAsConv2d(nn.Module):
    """A depthwise, stride-1 Conv3d computed as ``kt`` depthwise conv2d taps over frames."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        c = conv.in_channels
        if conv.groups != c or conv.out_channels != c:
            raise ValueError("only depthwise Conv3d (groups == in == out channels) is rewritten")
        if tuple(conv.stride) != (1, 1, 1) or tuple(conv.dilation) != (1, 1, 1):
            raise ValueError("only stride-1, dilation-1 depthwise Conv3d is rewritten")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only explicit zero padding is rewritten")
        kt, kh, kw = conv.kernel_size
        self.kt, self.pad_t = kt, conv.padding[0]
        self.taps = nn.ModuleList()
        for i in range(kt):
            tap = nn.Conv2d(c, c, (kh, kw), padding=tuple(conv.padding[1:]), groups=c,
                            bias=(i == 0 and conv.bias is not None))
            with torch.no_grad():
                tap.weight.copy_(conv.weight[:, :, i])
                if tap.bias is not None:
                    tap.bias.copy_(conv.bias)
            self.taps.append(tap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_t:
            x = nn.functional.pad(x, (0, 0, 0, 0, self.pad_t, self.pad_t))
        b, c, t, h, w = x.shape
        t_out = t - self.kt + 1
        frames = x.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W)
        out = None
        for i, tap in enumerate(self.taps):
            y = tap(frames[:, i:i + t_out].reshape(b * t_out, c, h, w))
            out = y if out is None else out + y
        ho, wo = out.shape[-2:]
        return out.reshape(b, t_out, c, ho, wo).permute(0, 2, 1, 3, 4)


def _unpatchify_rank5(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """S2DiT.unpatchify for patch (1, p, p) with rank <= 5 tensors (pixel_shuffle does the interleave)."""
    b = tokens.shape[0]
    t, h, w = grid
    p = self.cfg.patch_size[1]
    c = self.cfg.latent_channels
    x = tokens.reshape(b * t, h, w, c * p * p).permute(0, 3, 1, 2)
    x = nn.functional.pixel_shuffle(x, p)
    return x.reshape(b, t, c, h * p, w * p).permute(0, 2, 1, 3, 4)


class HostTimeFeatures(nn.Module):
    """TimestepEmbedding whose input is already the sinusoidal features (B, F, freq_dim)."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.freq_dim = src.freq_dim
        self.mlp, self.proj = src.mlp, src.proj

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temb = self.mlp(feats.to(self.mlp[0].weight.dtype))
        return temb, self.proj(temb).unflatten(-1, (6, -1))


def timestep_features(t: torch.Tensor, freq_dim: int, frames: int) -> torch.Tensor:
    """Host side of HostTimeFeatures: fp32 sinusoidal features of ``t`` (1,) -> (1, frames, freq_dim)."""
    from s2dit_deploy.model_zoo.blocks import sinusoidal_embedding

    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    feats = sinusoidal_embedding(t[:, None].expand(t.shape[0], frames), freq_dim)
    return feats.to(torch.float32).contiguous()


def _swap(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv3d) and child.groups > 1 and child.groups == child.in_channels:
            setattr(module, name, DepthwiseConv3dAsConv2d(child))
            count += 1
        else:
            count += _swap(child)
    return count


def rewrite_for_qnn(module: nn.Module, example: tuple, input_names: list[str]
                    ) -> tuple[nn.Module, tuple, dict[str, int], dict[str, Any]]:
    """A rewritten deep copy of ``module`` (the input is not modified), its example inputs, what
    was swapped, and the host-side input transform the runner must apply (``{}`` when none)."""
    new = copy.deepcopy(module).eval()
    counts = {"depthwise_conv3d_to_conv2d": _swap(new), "explicit_attention": explicit_attention(new)}
    host: dict[str, Any] = {}
    dit = getattr(new, "dit", None)
    if dit is not None and hasattr(dit, "unpatchify") and hasattr(dit, "time_embedding"):
        pt, ph, pw = dit.cfg.patch_size
        if pt == 1 and ph == pw:
            dit.unpatchify = types.MethodType(_unpatchify_rank5, dit)
            counts["unpatchify_rank5"] = 1
        if "t" in input_names and "x" in input_names:
            frames = dit.cfg.token_grid(*example[input_names.index("x")].shape[2:])[0]
            dit.time_embedding = HostTimeFeatures(dit.time_embedding)
            idx = input_names.index("t")
            host = {"t": {"kind": "timestep_features", "freq_dim": dit.time_embedding.freq_dim, "frames": frames}}
            example = tuple(timestep_features(a, **{k: v for k, v in host["t"].items() if k != "kind"})
                            if i == idx else a for i, a in enumerate(example))
            counts["host_timestep_features"] = 1
    log.info("QNN rewrites: %s", counts)
    return new, example, counts, host


def apply_host_inputs(host: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """Replace contract inputs by what the compiled graph takes (see ``rewrite_for_qnn``)."""
    if not host:
        return named
    out = dict(named)
    for name, spec in host.items():
        if spec["kind"] == "timestep_features":
            out[name] = timestep_features(torch.as_tensor(named[name]), spec["freq_dim"], spec["frames"])
        else:
            raise ValueError(f"unknown host input transform {spec['kind']!r}")
    return out
