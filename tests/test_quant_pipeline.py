"""Quantizer on s2dit-tiny: capture (and NaN naming), sensitivity cache resume, fake-quant fidelity, CLI."""

import argparse
import json

import pytest
import torch
from s2dit_deploy.model_zoo.pipeline import load_pipeline
from s2dit_deploy.quant.capture import CalibrationError, CalibrationSet, capture
from s2dit_deploy.quant.coreml import match_layer
from s2dit_deploy.quant.evaluate import plan_applied
from s2dit_deploy.quant.plan import preset_plan
from s2dit_deploy.quant.sensitivity import SensitivityRunner
from s2dit_deploy.quant.size import pipeline_layout

from s2dit_deploy.stages import build_stages
from s2dit_deploy.fidelity import psnr


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # On a loaded 2-core machine OpenMP spinning makes tiny models 20x slower with 2 threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("s2dit-tiny")


@pytest.fixture(scope="module")
def calib(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    return capture(tiny, ["a red ball", "a blue cube"], num_chunks=2, out_dir=out, progress=False)


def test_capture_records_every_call_and_round_trips(tiny, calib):
    info = calib.call_info("dit_step")
    steps = tiny.config.steps
    assert len(info) == 2 * 2 * (steps + 1)  # prompts x chunks x (steps + commit pass)
    assert sum(i["commit"] for i in info) == 4 and {i["chunk"] for i in info} == {0, 1}
    assert len(calib.call_info("decoder")) == 4 and len(calib.call_info("text_encoder")) == 2
    loaded = CalibrationSet.load(calib.path)
    assert loaded.hash == calib.hash and loaded.meta["prompts"] == ["a red ball", "a blue cube"]
    assert loaded.meta["seeds"] == [1000, 1001]
    x0 = loaded.calls("dit_step")[0]
    assert set(x0) == set(build_stages(tiny, ("dit_step",))["dit_step"].input_names)
    assert "sandwich.groups.0.high.0.attn.q" in loaded.stats["dit_step"]


def test_nan_in_calibration_names_the_layer(tmp_path):
    pipe = load_pipeline("s2dit-tiny")
    with torch.no_grad():
        pipe.dit.text_embedding.net[0].weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"NaN in the input of layer 'dit_step:text_embedding\.net\.2'"):
        capture(pipe, ["a red ball"], num_chunks=1, progress=False)


def test_nan_in_saved_calibration_names_the_tensor(calib, tmp_path):
    from safetensors.torch import save_file

    tensors = dict(calib.tensors)
    key = "dit_step/0003/x"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0, 0, 0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "calib.safetensors"), metadata={"meta": json.dumps(calib.meta)})
    with pytest.raises(CalibrationError, match="inf .*dit_step/0003/x"):
        CalibrationSet.load(tmp_path)


def test_fake_quant_presets_order_and_restore(tiny, calib):
    lay = pipeline_layout(tiny)
    stage = build_stages(tiny, ("dit_step",))["dit_step"]
    calls = [c for c, i in zip(calib.calls("dit_step"), calib.call_info("dit_step")) if not i["commit"]][:3]
    ref = torch.cat([stage.run_float(c)["velocity"].flatten() for c in calls])
    before = tiny.dit.head.weight.clone()
    got = {}
    for p in ("w8a8", "w4a8-uniform"):
        plan = preset_plan(p, lay, "s2dit-tiny", "coreml", calib.stats)
        with plan_applied(tiny, plan, ("dit_step",)):
            out = torch.cat([stage.run_float(c)["velocity"].flatten() for c in calls])
        got[p] = psnr(ref.numpy(), out.numpy())
    assert torch.equal(tiny.dit.head.weight, before)  # weights restored
    assert got["w8a8"] >= 35.0 and got["w8a8"] > got["w4a8-uniform"] + 6.0


def test_sensitivity_cache_resumes(tiny, calib, tmp_path):
    cache = tmp_path / "sens.json"
    layers = ["head", "sandwich.groups.0.high.0.ffn.0"]
    r1 = SensitivityRunner(tiny, calib, n_calls=1, cache_path=cache)
    res = r1.per_layer(("int4-pc",), ("int8-pc",), layers=layers[:1], progress=False)
    assert res["head"]["int4-pc"]["psnr"] < res["head"]["act_only"]["psnr"]
    assert res["head"]["int8-pc"]["estimated"] and res["head"]["int8-pc"]["mse"] < res["head"]["int4-pc"]["mse"]
    r2 = SensitivityRunner(tiny, calib, n_calls=1, cache_path=cache)
    calls = []
    orig = r2.measure
    r2.measure = lambda a: calls.append(list(a)) or orig(a)
    res2 = r2.per_layer(("int4-pc",), ("int8-pc",), layers=layers, progress=False)
    assert res2["head"] == res["head"]
    assert all(c == [layers[1]] for c in calls) and len(calls) == 2  # only the new layer was measured
    r3 = SensitivityRunner(tiny, calib, act="int16", n_calls=1, cache_path=cache)
    assert r3.results == {}  # another setting: the cache key differs


def test_coreml_and_xnnpack_layer_matching():
    layers = ["head", "sandwich.groups.0.high.0.attn.q", "patch_embed", "time_embedding.proj.1"]
    assert match_layer("p_dit_sandwich_groups_0_high_0_attn_q_weight_to_fp16", layers) == layers[1]
    assert match_layer("p_dit_sandwich_groups_0_high_0_attn_q_heads_1_weight_to_fp16", layers) == layers[1]
    assert match_layer("p_dit_head_weight_to_fp16", layers) == "head"
    assert match_layer("p_dit_time_embedding_proj_1_weight", layers) == "time_embedding.proj.1"
    assert match_layer("p_dit_sandwich_groups_0_high_0_attn_k_weight", layers) is None


def test_calibrate_cli_writes_a_legal_mixed_plan_that_compile_reuses(tmp_path, monkeypatch):
    from s2dit_deploy.quant.plan import QuantPlan

    from s2dit_deploy.commands import calibrate

    monkeypatch.setenv("S2DIT_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    calibrate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["calibrate", "--model", "s2dit-tiny", "--prompts", "1", "--chunks", "2", "--calls", "1",
                              "--measure", "int4-pc,int4-pc-gptq", "--estimate", "int8-pc", "--curve-points", "2",
                              "-o", str(tmp_path / "out" / "plan.json")])
    args.json = True
    result, text = calibrate.run(args)
    plan = QuantPlan.load(result["plan"])
    plan.check_target("coreml")
    assert plan.provenance["method"] == "sensitivity-allocation"
    assert plan.provenance["calibration_hash"] == result["calibration_hash"]
    assert plan.provenance["used_bytes"] <= plan.provenance["budget_bytes"]
    assert "int4-pc-gptq" in {lq.weight for lq in plan.stages["dit_step"].values()}
    assert (tmp_path / "out" / "plan.weights.safetensors").is_file()  # the GPTQ weights travel with the plan
    assert (tmp_path / "out" / "report-w4a8-mixed-coreml" / "sensitivity.png").is_file()
    assert str(tmp_path) not in (tmp_path / "out" / "plan.json").read_text()  # no absolute paths
    assert result["candidates"] and all("score_db" in c for c in result["candidates"]) and "wrote" in text
    # --quant w4a8-mixed is that same calibrated plan (found in the model's work folder), not a
    # recipe; it compiles, and the bundle carries the plan, its GPTQ weights, the table and the plots
    import s2dit_deploy as sd

    bundle = sd.compile("s2dit-tiny", target="coreml", quant="w4a8-mixed", stages=("dit_step",),
                        out_dir=tmp_path / "bundle", progress=False)
    info = bundle.info["quant_report"]
    assert info["plan"] == plan.name and info["avg_weight_bits"] < 16
    assert (bundle.path / "quant" / "sensitivity.png").is_file()
    doc = json.loads((bundle.path / "quant" / "report.json").read_text())
    assert doc["translations"]["dit_step"] and doc["layers"]["dit_step"][0]["weight"]
    assert QuantPlan.load(bundle.path / "quant" / "plan.json").stages == plan.stages
    assert "quant/plan.weights.safetensors" in bundle.manifest()["files"]
