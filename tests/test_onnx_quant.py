"""Quantized ``onnx`` (CPU EP) bundles of s2dit-tiny: they run, carry the planned bits and ranges,
quantize no non-compute tensor and build nothing in the system temp folder."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

import onnx  # noqa: E402

import s2dit_deploy as sd  # noqa: E402
from s2dit_deploy.fidelity import psnr  # noqa: E402
from s2dit_deploy.quant.capture import CALIB_PROMPTS, EVAL_PROMPTS  # noqa: E402
from s2dit_deploy.quant.layer_names import layer_pairs  # noqa: E402
from s2dit_deploy.stages import STAGE_NAMES, build_stages  # noqa: E402
from s2dit_deploy.targets.onnx.qdq import LAYER_MAP_KEY, plan_mismatches  # noqa: E402

# measured on s2dit-tiny (inputs from an evaluation prompt, none of the calibration prompts)
# (44.6 / 47.9 / 53.9 dB when written); floors leave ~10-13 dB of margin
W8A8_FLOOR = {"text_encoder": 35.0, "dit_step": 35.0, "decoder": 42.0}
EVAL_PROMPT = EVAL_PROMPTS[1]
assert EVAL_PROMPT not in CALIB_PROMPTS


def _temp_leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("s2dit-onnx-*")}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    before = _temp_leftovers()
    out = {q: sd.compile("s2dit-tiny", target="onnx", quant=q, out_dir=tmp_path_factory.mktemp(q), progress=False)
           for q in ("w8a8", "w4a8-uniform")}
    return out, _temp_leftovers() - before


@pytest.fixture(scope="module")
def eval_calls():
    from s2dit_deploy.recording import record_inputs

    pipe = sd.load_pipeline("s2dit-tiny")
    return pipe, build_stages(pipe), record_inputs(pipe, EVAL_PROMPT, 1, pipe.config.steps, 7)


def _plan(bundle):
    from s2dit_deploy.quant.plan import QuantPlan

    files = sorted(bundle.path.glob("quant/*plan*.json"))
    assert files, list(bundle.path.rglob("*"))
    return QuantPlan.load(files[0])


def _runner(bundle, stage):
    from s2dit_deploy.targets.onnx.export import OrtRunner

    art = bundle.artifacts[stage]
    return OrtRunner(bundle.file(stage), art.contract)


def test_no_system_temp_folder(bundles):
    assert bundles[1] == set()


@pytest.mark.parametrize("quant", ["w8a8", "w4a8-uniform"])
def test_every_stage_runs_and_no_resize_input_is_quantized(bundles, eval_calls, quant):
    bundle = bundles[0][quant]
    _, stages, calls = eval_calls
    for name in STAGE_NAMES:
        out = _runner(bundle, name).run({k: v.numpy() for k, v in calls[name][0].items()})
        assert all(np.isfinite(v).all() for v in out.values()), name
        model = onnx.load(str(bundle.file(name)))
        dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        resized = [i for n in model.graph.node if n.op_type == "Resize" for i in n.input if i in dq_out]
        assert resized == [], resized
        # only plan layers take quantized inputs (no shape / index / mask / scale tensor is quantized)
        planned = {n for v in json.loads({p.key: p.value for p in model.metadata_props}[LAYER_MAP_KEY])[
            "layers"].values() for n in v["nodes"]}
        takers = {n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                  and any(i in dq_out for i in n.input)}
        assert takers <= planned, sorted(takers - planned)[:5]
    assert not list(bundle.path.rglob(".*onnx-build*"))


@pytest.mark.parametrize("quant", ["w8a8", "w4a8-uniform"])
def test_every_plan_layer_is_matched_with_its_bits(bundles, quant):
    bundle = bundles[0][quant]
    plan = _plan(bundle)
    for name in STAGE_NAMES:
        assert plan_mismatches(bundle.file(name), plan, name) == [], name
        model = onnx.load(str(bundle.file(name)))
        meta = {p.key: p.value for p in model.metadata_props}
        recorded = json.loads(meta[LAYER_MAP_KEY])["layers"]
        assert set(recorded) == set(plan.stages[name])
        assert all(v["nodes"] for v in recorded.values())
        summary = bundle.artifacts[name].quant["layers"]
        assert {k: (v["act_bits"], v["weight_bits"]) for k, v in summary.items()} == layer_pairs(
            plan, name, allow_float_act=True)
    if quant == "w4a8-uniform":
        dit = bundle.artifacts["dit_step"].quant["layers"]
        assert sum(v["weight_bits"] == 4 for v in dit.values()) >= len(dit) - 5, dit


def test_tampered_plan_is_reported(bundles):
    from s2dit_deploy.quant.plan import QuantPlan

    bundle = bundles[0]["w8a8"]
    plan = _plan(bundle)
    layer = sorted(n for n, lq in plan.stages["dit_step"].items() if lq.act != "float")[0]
    stages = {s: dict(v) for s, v in plan.stages.items()}
    stages["dit_step"][layer] = replace(stages["dit_step"][layer], weight="int4-pc")
    bad = QuantPlan(plan.name, plan.model, stages, plan.target, plan.provenance)
    got = plan_mismatches(bundle.file("dit_step"), bad, "dit_step")
    assert len(got) >= 1 and layer in got[0] and "8-bit weights" in got[0] and "4" in got[0], got
    stages["dit_step"][layer] = replace(stages["dit_step"][layer], weight="int8-pc", act="int16")
    got = plan_mismatches(bundle.file("dit_step"), QuantPlan(plan.name, plan.model, stages), "dit_step")
    assert any(layer in g and "activations" in g for g in got), got


def test_plan_ranges_are_the_activation_scales(bundles):
    from onnx import numpy_helper

    bundle = bundles[0]["w8a8"]
    plan = _plan(bundle)
    model = onnx.load(str(bundle.file("dit_step")))
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    recorded = json.loads({p.key: p.value for p in model.metadata_props}[LAYER_MAP_KEY])["layers"]
    checked = 0
    for layer, lq in plan.stages["dit_step"].items():
        if lq.act_range is None:
            continue
        lo, hi = min(lq.act_range[0], 0.0), max(lq.act_range[1], 0.0)
        shared = [lay for lay, v in recorded.items() if any(
            nodes[n].input[0] == nodes[recorded[layer]["nodes"][0]].input[0] for n in v["nodes"])]
        if len(shared) > 1:  # consumers of one tensor get the union of their ranges
            rngs = [plan.stages["dit_step"][s].act_range for s in shared]
            lo, hi = min(min(r[0] for r in rngs), 0.0), max(max(r[1] for r in rngs), 0.0)
        dq = producers[nodes[recorded[layer]["nodes"][0]].input[0]]
        assert dq.op_type == "DequantizeLinear"
        scale = float(inits[dq.input[1]])
        assert scale == pytest.approx((hi - lo) / 255.0, rel=1e-3), layer
        checked += 1
    assert checked >= 50


def test_w8a8_fidelity_on_an_unseen_prompt(bundles, eval_calls, capsys):
    bundle = bundles[0]["w8a8"]
    _, stages, calls = eval_calls
    measured = {}
    for name in STAGE_NAMES:
        runner = _runner(bundle, name)
        ref, got = [], []
        for named in calls[name][:3]:
            r = stages[name].run_float(named)
            o = runner.run({k: v.numpy() for k, v in named.items()})
            out = stages[name].output_names[0]
            ref.append(r[out].numpy().ravel())
            got.append(np.asarray(o[out]).ravel())
        measured[name] = psnr(np.concatenate(ref), np.concatenate(got))
    with capsys.disabled():
        print(f"\nw8a8 onnx PSNR on {EVAL_PROMPT!r}: {measured}")
    assert all(measured[s] >= W8A8_FLOOR[s] for s in STAGE_NAMES), measured


def test_a_plan_layer_without_a_node_is_an_error(bundles, eval_calls, tmp_path):
    from s2dit_deploy.errors import CompileCheckError
    from s2dit_deploy.quant.onnx import PlanMatchError, translate
    from s2dit_deploy.quant.plan import QuantPlan
    from s2dit_deploy.targets.onnx.export import export_stage

    _, stages, _ = eval_calls
    plan = _plan(bundles[0]["w8a8"])
    export_stage(stages["text_encoder"], tmp_path / "te.onnx")
    model = onnx.load(str(tmp_path / "te.onnx"))
    assert len(translate(plan, stages["text_encoder"], model).layer_map()) == len(plan.stages["text_encoder"])
    layers = dict(plan.stages["text_encoder"])
    layers["model.encoder.layers.9.mlp.fc9"] = next(iter(layers.values()))
    bad = QuantPlan(plan.name, plan.model, {"text_encoder": layers})
    with pytest.raises(PlanMatchError, match="layers.9.mlp.fc9") as err:
        translate(bad, stages["text_encoder"], model)
    assert isinstance(err.value, CompileCheckError) and err.value.exit_code == 6
