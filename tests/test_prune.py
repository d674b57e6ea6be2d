"""Tri-level pruning: identity with all-ones masks, the dense model equals the masked one, exact-count
masks, the Eq. 5 alignment loss, sizing on paper, bad targets, and a pruned checkpoint through a target."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from s2dit_deploy.model_zoo.checkpoint import read_config, save_checkpoint
from s2dit_deploy.model_zoo.config import StreamConfig
from s2dit_deploy.model_zoo.dit import S2DiT
from s2dit_deploy.model_zoo.registry import get_card, load_stage
from s2dit_deploy.reference_training.losses import feature_alignment_loss
from s2dit_deploy.reference_training.prune.dense import to_dense
from s2dit_deploy.reference_training.prune.masks import (PruneMasks, PruneTargetError, all_ones, block_list,
                                                         check_masks, check_shape, masked)
from s2dit_deploy.reference_training.prune.plan import plan_shape, pruned_config, shape_params
from s2dit_deploy.reference_training.prune.train import aligners

from .conftest import tiny_dit_config


def _model(layout="LSSL") -> S2DiT:
    torch.manual_seed(0)
    model = S2DiT(tiny_dit_config(layout, num_heads=4, dim=64, ffn_dim=96)).eval()
    with torch.no_grad():  # non-trivial LCHA convs and samplers
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 6, 8, 12, generator=g), torch.rand(2, 6, generator=g), torch.randn(2, 5, 16, generator=g)


def test_all_ones_masks_are_the_identity():
    model = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, 3, 2)
        with masked(model, all_ones(model)):
            out = model(x, t, ctx, 3, 2)
        dense = to_dense(model, all_ones(model))
        again = dense(x, t, ctx, 3, 2)
    assert torch.equal(ref, out)
    assert (ref - again).abs().max() <= 1e-6


@pytest.mark.parametrize("layout", ["LSSL", "LFL"])
def test_dense_model_equals_the_masked_model(layout):
    model = _model(layout)
    shape = check_shape(model.cfg, model.cfg.num_groups + 1, 2, 48, 16)
    masks = PruneMasks(model, shape)
    with torch.no_grad():
        for p in masks.parameters():
            p.normal_()
    hard = masks.hard()
    x, t, ctx = _inputs()
    with torch.no_grad():
        with masked(model, hard):
            ref = model(x, t, ctx, 3, 2)
        dense = to_dense(model, hard)
        out = dense(x, t, ctx, 3, 2)
    assert (ref - out).abs().max() <= 1e-5
    cfg = dense.cfg
    assert (cfg.num_heads, cfg.attn_dim, cfg.ffn_dim, cfg.num_blocks) == (2, 2 * model.cfg.head_dim, 48, shape.keep_blocks)
    assert min(cfg.group_blocks) >= 1
    # the compact model streams with its own (narrower) caches like any model
    stream = StreamConfig(3, 2)
    cache = dense.init_cache(2, (8, 12), stream)
    v, entries = dense.step(x[:, :, :3], t[:, :3], ctx, cache, 0)
    assert v.shape == x[:, :, :3].shape and dense.push_cache(cache, entries).keys() == cache.keys()


def test_sampled_masks_have_exact_counts_and_gradients():
    model = _model()
    shape = check_shape(model.cfg, 5, 3, 32, 16)
    masks = PruneMasks(model, shape)
    g = torch.Generator().manual_seed(0)
    groups = [n for n, *_ in block_list(model)]
    for _ in range(20):
        m = masks.sample(0.5, g)
        assert int(m["blocks"].round().sum()) == 5
        kept = m["blocks"].detach().round()
        assert all(sum(float(kept[i]) for i, n in enumerate(groups) if n == grp) >= 1 for grp in set(groups))
        assert set((m["heads"].round().sum(1)).tolist()) == {3.0} and set(m["ffn"].round().sum(1).tolist()) == {32.0}
    loss = sum((v * torch.randn_like(v)).sum() for v in masks.sample(0.5, g).values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masks.parameters())


def test_alignment_loss_is_zero_for_identical_features():
    feats = [torch.randn(2, 7, 32) for _ in range(3)]
    maps = aligners(32, 32, 3)
    assert feature_alignment_loss(feats, feats, maps) == 0
    assert feature_alignment_loss(feats, [f + 0.1 for f in feats], maps) > 0
    wide = aligners(24, 32, 3)  # student narrower than teacher: a learnable 24 -> 32 map
    assert wide[0](torch.randn(2, 7, 24)).shape == (2, 7, 32)


def test_bad_pruning_targets_are_rejected():
    cfg = _model().cfg
    with pytest.raises(PruneTargetError, match="removes every head"):
        check_shape(cfg, None, 0, None, 16)
    with pytest.raises(PruneTargetError, match=r"keep_blocks=3 must be in \[4, 8\]"):
        check_shape(cfg, 3, None, None, 16)
    with pytest.raises(PruneTargetError, match="multiple of ffn_group"):
        check_shape(cfg, None, None, 40, 16)
    model = _model()
    masks = all_ones(model)
    masks["heads"][2] = 0
    with pytest.raises(PruneTargetError, match="removes every head of block groups.1.low.0"):
        check_masks(model, masks)


def test_plan_prices_shapes_exactly_and_meets_the_budget():
    base = get_card("s2dit-small").config.dit
    wide = dataclasses.replace(base, num_heads=5, attn_dim=320, ffn_dim=1152, blocks_per_group=3)
    target = 7_876_672  # s2dit-small's DiT
    shape, info = plan_shape(wide, target, 16)
    assert info["params"] <= target and info["params"] > 0.9 * target
    with torch.device("meta"):
        assert shape_params(wide, shape) == sum(p.numel() for p in S2DiT(pruned_config(wide, shape)).parameters())
    with pytest.raises(PruneTargetError, match="below the smallest shape"):
        plan_shape(wide, 1000, 16)


def test_seed_recipe_on_paper(capsys):
    """Taming-DiT's own target from a 2B base: 28 -> 20 blocks, 32 -> 20 heads, FFN -25 %."""
    from s2dit_deploy.cli import main

    assert main(["prune", "--plan", "--config", "reference_training/recipes/prune-seed-2b.json", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["blocks"] == [28, 20] and rep["heads"] == [32, 20] and rep["ffn_dim"] == [8192, 6144]
    assert 1.8e9 < rep["dit_params"]["teacher"] < 2.1e9 and 0.85e9 < rep["dit_params"]["pruned"] < 1.05e9
    assert rep["dit_step_ms"]["speedup"] > 1.3 and "not a measurement" in rep["latency_label"]


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A short real prune run of a (random-weight) s2dit-tiny supernet with 3 blocks per group."""
    from s2dit_deploy.cli import main

    root = tmp_path_factory.mktemp("prune")
    card = get_card("s2dit-tiny").config
    cfg = dataclasses.replace(card, dit=dataclasses.replace(card.dit, blocks_per_group=3), height=32, width=64)
    save_checkpoint(root / "wide", cfg, {s: load_stage(cfg, None, s) for s in ("text_encoder", "dit", "decoder")})
    conf = root / "cfg.json"
    conf.write_text(json.dumps({"count": 8, "heldout_count": 4, "batch_size": 2, "checkpoint_every": 2}))
    assert main(["prune", "--teacher", str(root / "wide"), "--out", str(root / "out"), "--keep-blocks", "7",
                 "--keep-heads", "1", "--keep-ffn", "32", "--mask-steps", "3", "--finetune-steps", "2",
                 "--config", str(conf), "--json"]) == 0
    return root / "out"


def test_prune_run_writes_a_dense_checkpoint(pruned_checkpoint):
    result = json.loads((pruned_checkpoint / "result" / "prune.json").read_text())
    cfg = read_config(pruned_checkpoint / "model")
    assert (cfg.dit.num_heads, cfg.dit.ffn_dim, cfg.dit.num_blocks) == (1, 32, 7)
    assert result["dit_params"]["pruned"] < 0.6 * result["dit_params"]["teacher"]
    assert all(v > 0 for v in result["mask_scores_moved"].values())  # phase 1 learned the masks


def test_pruned_checkpoint_compiles_with_no_special_support(pruned_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    import s2dit_deploy as sd

    bundle = sd.compile(str(pruned_checkpoint / "model"), target="onnx", out_dir=tmp_path / "b",
                        stages=("dit_step",), progress=False)
    report = sd.validate(bundle.path, num_chunks=2, stream=False, checkpoint=pruned_checkpoint / "model")
    worst = min(db for db in report["stages"]["dit_step"]["psnr_db"].values() if db is not None)
    assert worst > 60, report["stages"]["dit_step"]["psnr_db"]
