"""`s2dit-deploy train`: recipes have --help, configs load from JSON, a tiny codec run completes."""

import json

import pytest

from s2dit_deploy.commands import train
from s2dit_deploy.reference_training.configs import CodecTrainConfig, DistillConfig, PretrainConfig, load_config


def test_every_recipe_has_help(capsys):
    for recipe in ("codec", "pretrain", "distill", "decoder"):
        with pytest.raises(SystemExit) as exc:
            train.main([recipe, "--help"])
        assert exc.value.code == 0
        assert "--config" in capsys.readouterr().out


def test_configs_are_frozen_and_json_loadable(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"steps": 7, "data": {"height": 64}, "student_steps": [4, 1]}))
    cfg = load_config(DistillConfig, path, batch_size=4)
    assert cfg.steps == 7 and cfg.data.height == 64 and cfg.student_steps == (4, 1) and cfg.batch_size == 4
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen
    path.write_text(json.dumps({"stepz": 1}))
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(PretrainConfig, path)


def test_tiny_codec_run_through_the_cli(tmp_path, capsys):
    cfg = tmp_path / "codec.json"
    cfg.write_text(json.dumps({"channels": [8, 16], "stats_batches": 1, "batch_size": 1,
                               "data": {"height": 32, "width": 32, "chunks": 1}}))
    assert train.main(["--json", "codec", "--config", str(cfg), "--steps", "2", "--out", str(tmp_path / "c")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["params"] > 0
    assert (tmp_path / "c" / "codec.safetensors").is_file() and (tmp_path / "c" / "config.json").is_file()
    saved = load_config(CodecTrainConfig, tmp_path / "c" / "config.json")
    assert saved.channels == (8, 16) and saved.steps == 2
