"""Chunked streaming with fixed-shape caches equals the full-sequence forward with the
equivalent block-causal window (fp32, max abs error <= 1e-5)."""

import pytest
import torch

from s2dit_deploy.model_zoo.config import StreamConfig
from s2dit_deploy.model_zoo.dit import S2DiT

from .conftest import tiny_dit_config


def stream(model, x, t, ctx, stream_cfg):
    cache = model.init_cache(x.shape[0], x.shape[-2:], stream_cfg)
    shapes = {k: v.shape for k, v in cache.items()}
    outs, f = [], stream_cfg.chunk_frames
    for c in range(x.shape[2] // f):
        v, entries = model.step(x[:, :, c * f:(c + 1) * f], t[:, c * f:(c + 1) * f], ctx, cache, c * f)
        cache = model.push_cache(cache, entries)
        assert {k: v.shape for k, v in cache.items()} == shapes  # static shapes: exportable state
        outs.append(v)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("layout, pruned", [("LSSL", {}), ("LSLSL", {}), ("LFL", {}),
                                            ("LSSL", {"attn_dim": 16, "num_heads": 1, "group_blocks": (1, 2, 1, 2)})],
                         ids=["LSSL", "LSLSL", "LFL", "LSSL-pruned-widths"])
def test_streaming_equals_full_block_causal_window(layout, pruned):
    model = S2DiT(tiny_dit_config(layout, **pruned)).eval()
    cfg = StreamConfig(chunk_frames=3, window_chunks=2)
    x = torch.randn(2, 16, 15, 8, 12)  # 5 chunks: the window evicts chunks 0 and 1
    t = torch.rand(2, 15)
    ctx = torch.randn(2, 7, 16)
    with torch.no_grad():
        full = model(x, t, ctx, chunk_frames=3, window=2)
        chunked = stream(model, x, t, ctx, cfg)
        unbounded = model(x, t, ctx, chunk_frames=3, window=None)
    assert (full - chunked).abs().max() <= 1e-5
    # the window matters: with eviction the last chunks differ from unbounded causal attention
    assert (unbounded[:, :, 9:] - chunked[:, :, 9:]).abs().max() > 1e-3
    assert (unbounded[:, :, :9] - chunked[:, :, :9]).abs().max() <= 1e-5


def test_block_causality_future_chunks_do_not_leak():
    model = S2DiT(tiny_dit_config("LSSL")).eval()
    x = torch.randn(1, 16, 9, 8, 8)
    ctx = torch.randn(1, 7, 16)
    x2 = x.clone()
    x2[:, :, 6:] += 1.0
    with torch.no_grad():
        a = model(x, 0.5, ctx, chunk_frames=3, window=2)
        b = model(x2, 0.5, ctx, chunk_frames=3, window=2)
    assert (a[:, :, :6] - b[:, :, :6]).abs().max() <= 1e-6
    assert (a[:, :, 6:] - b[:, :, 6:]).abs().max() > 1e-3


def test_local_conv_reaches_into_previous_chunk_through_the_cache():
    model = S2DiT(tiny_dit_config("LL")).eval()
    cfg = StreamConfig(3, 2)
    x = torch.randn(1, 16, 6, 8, 8)
    ctx = torch.randn(1, 7, 16)
    with torch.no_grad():
        cache = model.init_cache(1, (8, 8), cfg)
        _, ent = model.step(x[:, :, :3], 0.3, ctx, cache, 0)
        filled = model.push_cache(cache, ent)
        assert filled["window_valid"].tolist() == [0.0, 1.0]
        tail_only = dict(cache, **{k: v for k, v in filled.items() if k.endswith("vtail")})
        with_tail, _ = model.step(x[:, :, 3:], 0.3, ctx, tail_only, 3)
        without, _ = model.step(x[:, :, 3:], 0.3, ctx, cache, 3)
    assert (with_tail - without).abs().max() > 1e-4
