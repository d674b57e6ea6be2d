"""`validate` judges every stage against a floor (target defaults, --floor overrides), exits 4
below it with the full table, verdicts and strict JSON, and notes stages the float model ran."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from s2dit_deploy import errors
from s2dit_deploy.cli import main


def strict(text: str):
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny fp32 onnx bundle of the decoder only (the other stages run in float)."""
    from s2dit_deploy.compiler import compile_model

    out = tmp_path_factory.mktemp("b") / "onnx"
    compile_model("s2dit-tiny", target="onnx", out_dir=out, stages=("decoder",), progress=False)
    return str(out)


def run_json(capsys, *argv):
    rc = main(["validate", *argv, "--chunks", "1", "--json"])
    return rc, strict(capsys.readouterr().out)


def test_passes_default_floors_with_verdicts_and_float_note(bundle, capsys):
    rc, doc = run_json(capsys, bundle)
    assert rc == 0 and doc["passed"]
    v = doc["verdicts"]["decoder"]
    assert v["passed"] and v["floor_db"] == 60.0 and v["worst_psnr_db"] >= 60.0
    assert doc["verdicts"]["stream"]["floor_db"] == 60.0
    assert doc["float_filled"] == ["text_encoder", "dit_step"]
    assert "dit_step: not in the bundle, the float model ran it" in doc["notes"]


def test_below_a_floor_exits_4_with_report_and_table(bundle, capsys):
    rc, doc = run_json(capsys, bundle, "--floor", "decoder=500")
    assert rc == errors.EXIT_FIDELITY and doc["error"] == "fidelity"
    assert doc["report"]["verdicts"]["decoder"]["passed"] is False
    assert "decoder" in doc["report"]["stages"]
    rc = main(["validate", bundle, "--chunks", "1", "--floor", "stream=500"])
    out = capsys.readouterr().out
    assert rc == errors.EXIT_FIDELITY
    assert "PSNR" in out and "decoder       PASS" in out and "stream        FAIL" in out


@pytest.fixture(scope="module")
def user_bundle(tmp_path_factory):
    """A decoder bundle compiled from a user checkpoint, plus a second checkpoint with other weights."""
    import torch

    import s2dit_deploy as sd
    from s2dit_deploy.compiler import compile_model
    from s2dit_deploy.model_zoo.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("user")
    pipe = sd.load_pipeline("s2dit-tiny")
    modules = {"text_encoder": pipe.text_encoder, "dit": pipe.dit, "decoder": pipe.decoder}
    mine = save_checkpoint(root / "mine", pipe.config, modules)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pipe.decoder.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(1e-3))
    other = save_checkpoint(root / "other", pipe.config, modules)
    out = root / "bundle"
    compile_model("s2dit-tiny", target="onnx", out_dir=out, checkpoint=mine, stages=("decoder",), progress=False)
    return str(out), str(mine), str(other)


def test_user_bundle_needs_its_checkpoint(user_bundle, capsys):
    out, mine, other = user_bundle
    rc, doc = run_json(capsys, out)
    assert rc == errors.EXIT_USAGE and "pass --checkpoint DIR" in doc["message"]
    rc, doc = run_json(capsys, out, "--checkpoint", other)
    assert rc == errors.EXIT_INPUT and "is not the one this bundle was compiled from" in doc["message"]
    rc, doc = run_json(capsys, out, "--checkpoint", mine)
    assert rc == 0 and doc["passed"], doc


def test_swapped_weights_fail_the_default_floor(user_bundle, capsys, monkeypatch):
    """Even past the digest check, other weights land far below the default floor: exit 4."""
    import s2dit_deploy.weights_source as ws
    from s2dit_deploy.bundle import load_bundle

    out, _mine, other = user_bundle
    recorded = load_bundle(out).model["checkpoint"]["sha256"]
    monkeypatch.setattr(ws, "_digest", lambda folder: recorded)
    rc, doc = run_json(capsys, out, "--checkpoint", other)
    assert rc == errors.EXIT_FIDELITY, doc
    assert doc["report"]["verdicts"]["decoder"]["passed"] is False


def test_unknown_floor_key_is_a_usage_error(bundle, capsys):
    rc, doc = run_json(capsys, bundle, "--floor", "dit_step=30")
    assert rc == errors.EXIT_USAGE and "dit_step" in doc["message"]
    rc, doc = run_json(capsys, bundle, "--floor", "decoder.nope=30")
    assert rc == errors.EXIT_USAGE and "nope" in doc["message"]


def test_no_floors_reports_only(bundle, capsys):
    rc, doc = run_json(capsys, bundle, "--no-floors")
    assert rc == 0 and doc["verdicts"]["decoder"]["floor_db"] is None


def test_a_failing_output_is_always_in_the_table(bundle, capsys):
    _rc, doc = run_json(capsys, bundle, "--no-floors")
    psnrs = doc["stages"]["decoder"]["psnr_db"]
    best = max((o for o in psnrs if psnrs[o] is not None), key=psnrs.get)  # null = identical
    rc = main(["validate", bundle, "--chunks", "1", "--floor", f"decoder.{best}=1000"])
    out = capsys.readouterr().out
    assert rc == errors.EXIT_FIDELITY
    assert any(line.split()[:2] == ["decoder", best] for line in out.splitlines()), out
    assert f"decoder       FAIL  worst {best}" in out
