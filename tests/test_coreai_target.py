"""The coreai target: .aimodel programs converted by coreai-torch, compressed by coreai-opt, and run
on Linux by Apple's Core AI runtime (coreai-core), checked against the float stages."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coreai_torch", reason="coreai-torch is not installed (s2dit-deploy[coreai], Python >= 3.11)")
pytest.importorskip("coreai_opt", reason="coreai-opt is not installed")

from tests.conftest import psnr  # noqa: E402
from tests.coreml_helpers import random_inputs, stages, tiny_pipeline  # noqa: E402

_ROOT = Path(tempfile.mkdtemp(prefix="s2dit-coreai-tests-"))


def _target():
    from s2dit_deploy.targets.base import get_target

    return get_target("coreai")


@functools.cache
def _compiled(stage_name: str, options: tuple = (), quant: str | None = None):
    """(stage, artifact, out_dir) of one tiny stage compiled by the coreai target (cached per process)."""
    from s2dit_deploy.quant.resolve import resolve_plan

    stage = stages()[stage_name]
    plan = resolve_plan(quant, tiny_pipeline(), "coreai") if quant else None
    out = _ROOT / f"{stage_name}-{abs(hash((options, quant)))}"
    out.mkdir(parents=True, exist_ok=True)
    return stage, _target().compile(stage, plan, out, dict(options)), out


def _run(stage_name: str, options: tuple = (), quant: str | None = None, seed: int = 0):
    stage, art, out = _compiled(stage_name, options, quant)
    named = random_inputs(stage, seed)
    got = _target().load(art, out).run({k: v.numpy() for k, v in named.items()})
    return stage, art, named, got


@pytest.mark.parametrize("stage_name", ["text_encoder", "dit_step", "decoder"])
def test_fp32_programs_match_float_within_1e_4(stage_name):
    """fp32 programs on the Core AI runtime equal the float stage to 1e-4 relative (ANE rewrite on)."""
    stage, art, named, got = _run(stage_name, (("precision", "fp32"),))
    assert art.files == [f"{stage_name}.aimodel"] and art.metadata["compute_precision"] == "fp32"
    ref = stage.run_float(named)
    for name in stage.output_names:
        r, g = ref[name].numpy().astype(np.float64), got[name].astype(np.float64)
        rel = np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-30)
        assert rel < 1e-4, (name, rel)


def test_fp16_program_computes_in_fp16_and_agrees_with_the_core_ml_executor():
    """The default fp16 program is fp16 end to end on the runtime (not fp32-exact), and matches the
    Core ML reference executor's fp16 semantics on the same stage: two independent fp16 executors."""
    pytest.importorskip("coremltools")
    from s2dit_deploy.targets.coreai.runtime import descriptor
    from s2dit_deploy.targets.coreml.target import TARGET as COREML
    from tests.coreml_helpers import compiled

    stage, art, named, got = _run("dit_step")
    _, out_dir = _compiled("dit_step")[1:]
    io = descriptor(out_dir / art.files[0])
    assert set(io["inputs"].values()) <= {"float16", "int32"} and set(io["outputs"].values()) == {"float16"}
    ref = stage.run_float(named)
    db = psnr(ref["velocity"], torch.from_numpy(got["velocity"]))
    assert 50.0 < db < 100.0, db  # fp16 rounding, far from the 130+ dB of an fp32 program
    _, cm_art, cm_dir = compiled("dit_step")
    cm = COREML.load(cm_art, cm_dir).run({k: v.numpy() for k, v in named.items()})
    assert psnr(torch.from_numpy(cm["velocity"]), torch.from_numpy(got["velocity"])) > 50.0
    assert "fp16" in _target().numerics(art) and "Core AI runtime" in _target().numerics(art)


def test_decoder_is_stock_unless_asked():
    _, art, _ = _compiled("decoder", (("precision", "fp32"),))
    assert art.metadata["layout"] == "stock"
    _, art, _ = _compiled("decoder", (("precision", "fp32"), ("rewrite_decoder", True)))
    assert art.metadata["layout"] != "stock"


def test_streaming_over_three_chunks_equals_the_float_pipeline(tiny_coreai_bundle):
    """A whole tiny bundle (explicit cache I/O) streamed by the host pipeline equals float streaming."""
    from s2dit_deploy.bundle import load_bundle
    from s2dit_deploy.host import bundle_pipeline
    from s2dit_deploy.model_zoo.pipeline import load_pipeline

    bundle = load_bundle(tiny_coreai_bundle)
    assert {a.files[0] for a in bundle.artifacts.values()} == {"text_encoder.aimodel", "dit_step.aimodel",
                                                               "decoder.aimodel"}
    pipe = load_pipeline("s2dit-tiny")
    ref = pipe.generate("a red ball", num_chunks=3, steps=2, seed=0)
    got = bundle_pipeline(bundle, pipe).generate("a red ball", num_chunks=3, steps=2, seed=0)
    assert got.shape == ref.shape
    # uint8 frames: fp32 programs may flip a rounding boundary on a few pixels, never more than one level
    diff = np.abs(ref.astype(np.int16) - got.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_w8a8_plan_is_compressed_by_coreai_opt_and_stays_above_its_floor():
    """The w8a8 preset on the fp16 DiT: real int8 constants (smaller asset), every plan layer
    accounted for, scored on inputs that are not its calibration data (random, seed 7)."""
    stage, art, named, got = _run("dit_step", (), "w8a8", seed=7)
    _, float_art, _ = _compiled("dit_step")
    q = art.quant
    assert q["library"].startswith("coreai-opt") and q["counts"].get("int8-pc", 0) >= 40
    assert len(q["act_quantized"]) >= 40
    # the rewrite's banded local-conv weights stay fp16, and the artifact says why
    assert set(q["kept_float"]) == {n for n in q["layer_weights"] if n.endswith("attn.local")}
    assert sum(art.metadata["asset_bytes"].values()) < sum(float_art.metadata["asset_bytes"].values())
    # the text encoder, whose asset is nearly all weights: int8 storage is real (measured 0.57x of fp16)
    te_q, te_f = _compiled("text_encoder", (), "w8a8")[1], _compiled("text_encoder")[1]
    assert sum(te_q.metadata["asset_bytes"].values()) < 0.65 * sum(te_f.metadata["asset_bytes"].values())
    from s2dit_deploy.quant.resolve import resolve_plan

    plan = resolve_plan("w8a8", tiny_pipeline(), "coreai")
    assert _target().check_plan(art, _compiled("dit_step", (), "w8a8")[2], plan) == []
    ref = stage.run_float(named)
    # measured 43.6 dB (fp32 program) on this input; 35 dB leaves 8 dB for fp16 and seed noise
    assert psnr(ref["velocity"], torch.from_numpy(got["velocity"])) > 35.0


def test_a_plan_on_a_chunked_dit_is_refused_not_silently_left_float():
    """The splitter's pieces hold weights as plain GraphModule attributes, which coreai-opt cannot
    quantize: a plan there is refused up front instead of compiling a float program under its name."""
    from s2dit_deploy.quant.resolve import resolve_plan
    from s2dit_deploy.targets.coreai.compress import PlanNotExpressible

    out = _ROOT / "chunked-plan"
    out.mkdir(exist_ok=True)
    with pytest.raises(PlanNotExpressible, match="chained pieces"):
        _target().compile(stages()["dit_step"], resolve_plan("w8a8", tiny_pipeline(), "coreai"), out,
                          {"chunks": 2})
    assert not list(out.iterdir())  # nothing converted


def test_an_op_coreai_torch_cannot_lower_names_the_op_and_the_stage():
    from s2dit_deploy.stages import Stage, TensorSpec
    from s2dit_deploy.targets.coreai.convert import CoreAIConversionError

    class Erfinv(torch.nn.Module):
        def forward(self, x):
            return (torch.special.erfinv(x * 0.5),)

    x = torch.rand(1, 8)
    stage = Stage("odd_stage", Erfinv(), (x,), (TensorSpec.of("x", x),), (TensorSpec.of("y", x),))
    out = _ROOT / "bad-op"
    out.mkdir(exist_ok=True)
    with pytest.raises(CoreAIConversionError, match=r"odd_stage.*aten\.erfinv"):
        _target().compile(stage, None, out, {"precision": "fp32"})


def test_schemes_coreai_opt_cannot_express_are_refused_before_any_work():
    from s2dit_deploy.quant.plan import LayerQuant, QuantPlan
    from s2dit_deploy.targets.coreai.compress import PlanNotExpressible, check_plan_expressible

    plan = QuantPlan("p", "s2dit-tiny", {"dit_step": {"patch_embed": LayerQuant("int8-pc", "int16", (-1.0, 1.0))}})
    with pytest.raises(PlanNotExpressible, match=r"dit_step:patch_embed.*8-bit activations"):
        check_plan_expressible(plan, ("dit_step",))
    with pytest.raises(ValueError, match="coreai"):  # per-block weights: not a Neural Engine scheme
        QuantPlan("p", "s2dit-tiny", {"dit_step": {"patch_embed": LayerQuant("int4-b32", "float")}}
                  ).check_target("coreai")
    no_range = QuantPlan("p", "s2dit-tiny", {"dit_step": {"patch_embed": LayerQuant("int8-pc", "int8")}})
    with pytest.raises(PlanNotExpressible, match="act_range"):
        check_plan_expressible(no_range, ("dit_step",))


def test_bad_options_name_the_option():
    from s2dit_deploy.targets.base import TargetOptionError

    with pytest.raises(TargetOptionError, match="precision"):
        _target().parse_options({"precision": "bf16"})
    with pytest.raises(TargetOptionError, match="chunks must be >= 0"):
        _target().parse_options({"chunks": "-1"})
    with pytest.raises(TargetOptionError, match="io_dtype"):
        _target().parse_options({"io_dtype": "fp16"})


def test_a_missing_or_broken_program_names_the_file(tmp_path):
    from s2dit_deploy.targets.coreai.runtime import CoreAILoadError

    _, art, out = _compiled("text_encoder", (("precision", "fp32"),))
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    (copy / "text_encoder.aimodel" / "main.mlirb").unlink()
    with pytest.raises(CoreAILoadError, match="text_encoder.aimodel"):
        _target().load(art, copy)
    shutil.rmtree(copy / "text_encoder.aimodel")
    with pytest.raises(CoreAILoadError, match="text_encoder.aimodel"):
        _target().load(art, copy)


def test_without_the_runtime_the_target_is_unavailable(monkeypatch):
    import importlib
    import sys

    from s2dit_deploy.targets.base import TargetUnavailable, get_target

    monkeypatch.setitem(sys.modules, "coreai", None)
    monkeypatch.setitem(sys.modules, "coreai.runtime", None)
    monkeypatch.delitem(sys.modules, "s2dit_deploy.targets.coreai.target", raising=False)
    with pytest.raises(TargetUnavailable, match=r"s2dit-deploy\[coreai\]"):
        get_target("coreai")
    monkeypatch.undo()
    importlib.import_module("s2dit_deploy.targets.coreai.target")
