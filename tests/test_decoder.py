"""Efficient causal decoder: shapes, streaming == one-shot, causality, explicit-cache export."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2dit_deploy.model_zoo.config import DecoderConfig
from s2dit_deploy.model_zoo.registry import get_card
from s2dit_deploy.model_zoo.decoder import (
    CausalConv3d,
    EfficientDecoder,
    FrameGroupNorm,
    TemporalUpsample,
)

# Second narrow variant: late temporal upsampling, two blocks per stage, 2 channels per group.
DECODER_MOBILE = get_card("s2dit-mobile").config.decoder
DECODER_SMALL = get_card("s2dit-small").config.decoder
DECODER_TINY = get_card("s2dit-tiny").config.decoder
TINY_LATE = dataclasses.replace(DECODER_TINY, temporal_up_at=(1, 2), blocks_per_stage=2, groups=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many small convs: one thread avoids OpenMP barrier stalls when the 2 cores are shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _decoder(cfg: DecoderConfig = DECODER_TINY, seed: int = 0) -> EfficientDecoder:
    torch.manual_seed(seed)
    dec = EfficientDecoder(cfg).eval()
    # Non-trivial affine norms so that the tests also exercise weight/bias.
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, FrameGroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return dec


def _latent(t: int, h: int = 4, w: int = 6, seed: int = 1, batch: int = 2) -> torch.Tensor:
    # batch 2: also checks that samples stay independent, and on CPU it takes PyTorch's oneDNN
    # conv3d path (batch 1 with few channels falls back to the much slower slow_conv3d).
    return torch.randn(batch, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_output_shape_512x288_and_cache_shapes():
    dec = _decoder()
    z = _latent(3, 36, 64, batch=1)
    video, cache = dec(z)
    assert video.shape == (1, 3, 12, 288, 512)
    assert torch.isfinite(video).all()
    assert [c.shape for c in cache] == [c.shape for c in dec.init_cache(1, 36, 64)]


@torch.no_grad()
@pytest.mark.parametrize("cfg", [DECODER_TINY, TINY_LATE], ids=["tiny", "tiny_late"])
def test_chunked_equals_full(cfg):
    dec = _decoder(cfg)
    z = _latent(12)
    full = dec.decode_full(z)
    assert full.shape == (2, 3, 48, 32, 48)
    cache, chunks, fresh = dec.init_cache(2, 4, 6), [], []
    for i in range(4):
        y, cache = dec(z[:, :, 3 * i : 3 * i + 3], cache)
        chunks.append(y)
        fresh.append(dec(z[:, :, 3 * i : 3 * i + 3])[0])  # no carried cache
    chunked = torch.cat(chunks, dim=2)
    assert (chunked - full).abs().max().item() <= 1e-5
    # Sensitivity: dropping the carried cache must visibly change later chunks.
    assert (torch.cat(fresh, dim=2) - full)[:, :, 12:].abs().max().item() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("cfg", [DECODER_TINY, TINY_LATE], ids=["tiny", "tiny_late"])
def test_future_latents_do_not_change_past_frames(cfg):
    dec = _decoder(cfg)
    z = _latent(12, 2, 4)
    z2 = z.clone()
    z2[:, :, 9:] += 3.0 * torch.randn_like(z2[:, :, 9:])
    y, y2 = dec.decode_full(z), dec.decode_full(z2)
    assert (y[:, :, :36] - y2[:, :, :36]).abs().max().item() <= 1e-6
    assert (y[:, :, 36:] - y2[:, :, 36:]).abs().max().item() > 1e-3
    # Finer grain: latent frame k only reaches output frames >= 4k.
    z3 = z.clone()
    z3[:, :, 5] += 1.0
    y3 = dec.decode_full(z3)
    assert (y[:, :, :20] - y3[:, :, :20]).abs().max().item() <= 1e-6
    assert (y[:, :, 20:24] - y3[:, :, 20:24]).abs().max().item() > 1e-4


@torch.no_grad()
def test_init_cache_matches_returned_cache():
    dec = _decoder(TINY_LATE)
    init = dec.init_cache(2, 4, 6, dtype=torch.float64)
    assert len(init) == dec.num_cache_tensors
    assert all(c.dtype == torch.float64 and not c.any() for c in init)
    z = _latent(3)
    y0, cache0 = dec(z)
    y1, cache1 = dec(z, dec.init_cache(2, 4, 6))
    assert [c.shape for c in cache0] == [c.shape for c in init]
    assert [c.shape for c in cache1] == [c.shape for c in init]
    assert torch.equal(y0, y1)
    with pytest.raises(ValueError, match="cache has"):
        dec(z, init[:-1])


def test_export_one_chunk_with_explicit_cache():
    dec = _decoder()
    with torch.no_grad():
        _, cache = dec(_latent(3, seed=2))  # non-zero state, as mid-stream
        z = _latent(3, seed=3)
        ref, ref_cache = dec(z, cache)
    ep = torch.export.export(dec, (z, cache))
    with torch.no_grad():
        out, out_cache = ep.module()(z, cache)
    assert out.shape == ref.shape == (2, 3, 12, 32, 48)
    assert (out - ref).abs().max().item() <= 1e-5
    assert len(out_cache) == len(ref_cache) == dec.num_cache_tensors
    for a, b in zip(out_cache, ref_cache):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


def test_group_norm_is_per_frame():
    torch.manual_seed(0)
    norm = FrameGroupNorm(2, 4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 5, 3, 3) * torch.tensor([1.0, 10.0, 0.1, 3.0, 30.0]).view(1, 1, 5, 1, 1)
    y = norm(x)
    b, c, t, h, w = x.shape
    per_frame = F.group_norm(
        x.transpose(1, 2).reshape(b * t, c, h, w), 2, norm.weight, norm.bias, norm.eps
    ).reshape(b, t, c, h, w).transpose(1, 2)
    assert (y - per_frame).abs().max().item() <= 1e-5
    over_time = F.group_norm(x, 2, norm.weight, norm.bias, norm.eps)  # statistics over T too
    assert (y - over_time).abs().max().item() > 0.1
    x2 = x.clone()
    x2[:, :, 4] *= 100.0
    assert torch.equal(norm(x2)[:, :, :4], y[:, :, :4])
    # The decoder must use only per-frame norms.
    dec = _decoder()
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm3d)) for m in dec.modules())
    assert sum(isinstance(m, FrameGroupNorm) for m in dec.modules()) > 0


def test_causal_conv_is_left_padded_conv3d():
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, (3, 3, 3))
    x = torch.randn(1, 3, 4, 5, 6)
    past = torch.randn(1, 3, 2, 5, 6)
    y, new_past = conv(x, past)
    ref = F.conv3d(F.pad(torch.cat([past, x], 2), (1, 1, 1, 1)), conv.conv.weight, conv.conv.bias)
    assert y.shape == (1, 5, 4, 5, 6)
    assert (y - ref).abs().max().item() <= 1e-5
    assert torch.equal(new_past, x[:, :, -2:])
    # A 1-frame chunk keeps one frame of the old past.
    _, np1 = conv(x[:, :, :1], past)
    assert torch.equal(np1, torch.cat([past[:, :, 1:], x[:, :, :1]], 2))


def test_temporal_upsample_is_causal_and_doubles_time():
    torch.manual_seed(0)
    up = TemporalUpsample(4)
    x = torch.randn(1, 4, 3, 2, 2)
    past = [torch.zeros(1, 4, 2, 2, 2)]
    y, _ = up(x, past)
    assert y.shape == (1, 4, 6, 2, 2)
    x2 = x.clone()
    x2[:, :, 1] += 1.0
    y2, _ = up(x2, past)
    assert torch.equal(y[:, :, :2], y2[:, :, :2])
    assert (y[:, :, 2:4] - y2[:, :, 2:4]).abs().min().item() > 0  # both frames of input 1 move


def test_preset_sizes():
    sizes = {}
    for name, cfg in [("mobile", DECODER_MOBILE), ("small", DECODER_SMALL), ("tiny", DECODER_TINY)]:
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in EfficientDecoder(cfg).parameters())
    assert 13e6 <= sizes["mobile"] <= 15e6
    assert 1e6 <= sizes["small"] <= 3e6
    assert sizes["tiny"] < 100e3


def test_config_roundtrip_and_bad_temporal_stage():
    cfg = DecoderConfig.from_dict(DECODER_MOBILE.to_dict())
    assert cfg == DECODER_MOBILE
    with pytest.raises(ValueError):
        EfficientDecoder(dataclasses.replace(DECODER_TINY, temporal_up_at=(0, -1)))
