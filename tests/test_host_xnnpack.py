"""End to end from an executorch-xnnpack bundle of s2dit-tiny: generate, validate, bench, atomicity."""

import numpy as np
import pytest

pytest.importorskip("executorch")

import s2dit_deploy as sd  # noqa: E402
from s2dit_deploy.bench.harness import bench_bundle  # noqa: E402
from s2dit_deploy.bundle import load_bundle  # noqa: E402
from s2dit_deploy.host import bundle_pipeline  # noqa: E402
from s2dit_deploy.fidelity import psnr  # noqa: E402

PROMPT = "a red ball bouncing"


@pytest.fixture(scope="module")
def tiny_bundle(tiny_xnnpack_bundle):
    return tiny_xnnpack_bundle  # shared with tests/test_app_bundle.py (read-only)


def test_bundle_files_and_manifest(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.target == "executorch-xnnpack" and set(b.artifacts) == {"text_encoder", "dit_step", "decoder"}
    for name, art in b.artifacts.items():
        assert art.files == [f"{name}.pte"] and (tiny_bundle / art.files[0]).is_file()
        assert art.metadata["delegation"]["delegated_nodes"] > 0
        assert [s["name"] for s in art.contract["inputs"]]
    assert b.artifacts["dit_step"].metadata["swaps"]["conv3d_as_conv2d"] >= 1


def test_generate_from_bundle_matches_float(tiny_bundle):
    pipe = sd.load_pipeline("s2dit-tiny")
    ref = pipe.generate(PROMPT, num_chunks=2, steps=2, seed=0)
    got = bundle_pipeline(load_bundle(tiny_bundle)).generate(PROMPT, num_chunks=2, steps=2, seed=0)
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert psnr(ref.astype(np.float32), got.astype(np.float32)) >= 40.0


def test_validate_per_stage(tiny_bundle):
    rep = sd.validate(str(tiny_bundle), num_chunks=1, steps=1)
    for stage, fid in rep["stages"].items():
        assert fid["calls"] >= 1
        assert min(fid["psnr_db"].values()) >= 60.0, (stage, fid["psnr_db"])
    assert rep["stream"]["psnr_db"] >= 40.0


def test_bench_every_stage(tiny_bundle):
    rep = bench_bundle(tiny_bundle, repeats=3, warmup=1, profile=False)
    assert set(rep["stages"]) == {"text_encoder", "dit_step", "decoder"}
    assert all(s["median_ms"] > 0 for s in rep["stages"].values())


def test_failing_stage_leaves_no_bundle(tmp_path, monkeypatch):
    from s2dit_deploy.stages import DecoderStage
    from s2dit_deploy.targets.xnnpack import target as xt

    real = xt.export_for_xnnpack

    def failing(module, example):
        if any(isinstance(m, DecoderStage) for m in module.modules()):
            raise RuntimeError("injected failure in the decoder stage")
        return real(module, example)

    monkeypatch.setattr(xt, "export_for_xnnpack", failing)
    from s2dit_deploy.bundle import atomic_bundle

    out = tmp_path / "bundle"
    with atomic_bundle(out, "executorch-xnnpack", {"name": "previous"}):
        pass  # a previous (empty) bundle: the only kind of folder a compile may replace without --force
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError, match="injected"):
        sd.compile("s2dit-tiny", target="executorch-xnnpack", out_dir=out, stages=("text_encoder", "decoder"),
                   progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no partial folder left behind
    assert sorted(p.name for p in out.iterdir()) == before  # the previous bundle is untouched


def test_bad_option_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="xnnpack_quant"):
        sd.compile("s2dit-tiny", target="executorch-xnnpack", out_dir=tmp_path / "b", xnnpack_quant="int2",
                   stages=("decoder",), progress=False)
    assert not (tmp_path / "b").exists()
