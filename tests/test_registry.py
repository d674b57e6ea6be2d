"""Model cards, checkpoint round trips, and clear errors for bad names and bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import s2dit_deploy as sd
from s2dit_deploy.model_zoo.checkpoint import CheckpointError, save_checkpoint
from s2dit_deploy.model_zoo.registry import get_card, load_stage


def test_list_models_reports_three_cards_with_paper_scale_mobile():
    models = {m["name"]: m for m in sd.list_models()}
    assert set(models) == {"s2dit-tiny", "s2dit-small", "s2dit-mobile"}
    mobile = models["s2dit-mobile"]
    assert 1.7e9 < mobile["params"]["dit"] < 1.9e9  # the review seed: ~1.8B student
    assert 120e6 < mobile["params"]["text_encoder"] < 126e6  # CLIP ViT-L/14 text tower
    assert mobile["resolution"] == "288x512" and mobile["chunk_latent_shape"] == [16, 3, 36, 64]
    assert mobile["tokens_per_chunk_step"] == 1728
    assert models["s2dit-tiny"]["params"]["dit"] < models["s2dit-small"]["params"]["dit"]


def test_flops_linear_attention_is_cheaper_than_dense():
    tiny = sd.api.model_summary("s2dit-small", with_flops=True)
    assert 0 < tiny["dit_step_flops"] < tiny["dit_step_flops_full_attention"]


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model 's2dit-huge'.*available: s2dit-tiny"):
        sd.load_model("s2dit-huge")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    cfg = get_card("s2dit-tiny").config
    modules = {s: load_stage(cfg, None, s, seed=3) for s in ("dit", "text_encoder", "decoder")}
    return save_checkpoint(tmp_path / "ckpt", cfg, modules), modules


def test_checkpoint_round_trip_reproduces_outputs(tiny_checkpoint):
    folder, modules = tiny_checkpoint
    assert not list(folder.parent.glob(".ckpt.*"))  # no temp folder left behind
    loaded = sd.load_model("s2dit-tiny", checkpoint=folder)
    x, ctx = torch.randn(1, 16, 3, 8, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.5, ctx), modules["dit"](x, 0.5, ctx))


def test_missing_weight_file(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    (folder / "dit.safetensors").unlink()
    with pytest.raises(CheckpointError, match="dit.safetensors is missing"):
        sd.load_model("s2dit-tiny", checkpoint=folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        sd.load_model("s2dit-tiny", checkpoint=tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        sd.load_model("s2dit-tiny", checkpoint=tmp_path / "empty")


def test_corrupt_weight_file(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    (folder / "dit.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        sd.load_model("s2dit-tiny", checkpoint=folder)


def test_weights_that_do_not_match_the_config(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dit"]["dim"] = 64
    cfg["dit"]["num_heads"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json.*wrong shapes"):
        sd.load_model("s2dit-tiny", checkpoint=folder)


def test_layout_mismatch_names_missing_and_unexpected(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dit"]["layout"] = "LLLL"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        sd.load_model("s2dit-tiny", checkpoint=folder)


def test_nan_weights_are_rejected(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    state = load_file(str(folder / "decoder.safetensors"))
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(folder / "decoder.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        sd.load_pipeline("s2dit-tiny", checkpoint=folder)


def test_invalid_config_json(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        sd.load_model("s2dit-tiny", checkpoint=folder)
