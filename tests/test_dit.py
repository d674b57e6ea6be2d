"""Shapes at the paper's 512x288, timestep handling, and config validation."""

import dataclasses
import json

import pytest
import torch

from s2dit_deploy.model_zoo.config import DiTConfig, ModelConfig, StreamConfig
from s2dit_deploy.model_zoo.dit import S2DiT
from s2dit_deploy.model_zoo.registry import get_card

from .conftest import tiny_dit_config


def test_chunk_step_shapes_at_512x288():
    card = get_card("s2dit-mobile").config
    assert card.chunk_latent_shape == (16, 3, 36, 64)
    cfg = tiny_dit_config(card.dit.layout)  # mobile layout at toy width
    model = S2DiT(cfg).eval()
    x = torch.randn(1, *card.chunk_latent_shape)
    cache = model.init_cache(1, (36, 64), StreamConfig())
    assert cache["groups.0.high.0.kv"].shape == (2, 1, 2, 16, 16)
    assert cache["groups.3.low.0.k"].shape == (1, 2, 2 * 3 * 9 * 16, 16)
    with torch.no_grad():
        v, entries = model.step(x, 1.0, torch.randn(1, 77, 16), cache, 0)
    assert v.shape == x.shape
    assert entries["groups.0.high.0.vtail"].shape == (1, 32, 2, 18, 32)
    assert model.cfg.token_grid(3, 36, 64) == (3, 18, 32)


def test_scalar_batch_and_per_frame_timesteps_agree():
    model = S2DiT(tiny_dit_config()).eval()
    x, ctx = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        a = model(x, 0.25, ctx)
        b = model(x, torch.full((2,), 0.25), ctx)
        c = model(x, torch.full((2, 3), 0.25), ctx)
        d = model(x, torch.tensor([[0.25, 0.25, 0.9], [0.25, 0.25, 0.25]]), ctx)
    assert torch.equal(a, b) and torch.allclose(a, c)
    assert not torch.allclose(a[0], d[0])


def test_gradients_reach_every_parameter():
    model = S2DiT(tiny_dit_config("LSLSL"))
    model(torch.randn(1, 16, 3, 8, 8), torch.rand(1), torch.randn(1, 5, 16), chunk_frames=3, window=2).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layout="SLL"), "first and last"),
        (dict(layout="LXL"), "unknown group types"),
        (dict(layout="LFL", search=True), "search mode"),
        (dict(num_heads=3), "divisible"),
        (dict(attn_dim=24, num_heads=5), "attn_dim=24 is not divisible"),
        (dict(group_blocks=(1, 2)), "group_blocks has 2 entries"),
        (dict(group_blocks=(1, 0, 1, 1)), r"group_blocks\[1\] must be in \[1, 64\]"),
    ],
)
def test_bad_dit_configs_are_rejected(kwargs, match):
    base = dict(dim=32, num_heads=2, ffn_dim=64, layout="LSSL", text_dim=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DiTConfig(**base)


def test_resolution_not_divisible_by_patch_and_stride_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        tiny_dit_config().token_grid(3, 36, 66)


def test_config_json_round_trip():
    cfg = get_card("s2dit-small").config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "attn_dim" not in cfg.dit.to_dict()  # unset pruning fields keep old config.json files as they were
    pruned = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_heads=2, attn_dim=128,
                                                              group_blocks=(2, 1, 1, 2, 1, 2)))
    assert ModelConfig.from_dict(json.loads(json.dumps(pruned.to_dict()))) == pruned
    assert pruned.dit.num_blocks == 9 and pruned.dit.head_dim == 64
    with pytest.raises(ValueError, match="unknown config keys"):
        DiTConfig.from_dict({**cfg.dit.to_dict(), "bogus": 1})
