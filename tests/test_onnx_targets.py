"""ONNX (CPU) and ONNX Runtime QNN EP targets on s2dit-tiny stages with recorded real inputs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from s2dit_deploy.targets.base import get_target

from s2dit_deploy.stages import build_stages
from s2dit_deploy.fidelity import psnr


@pytest.fixture(scope="module")
def tiny():
    from s2dit_deploy.targets.qnn.calibration import recorded_inputs

    import s2dit_deploy as sd

    pipe = sd.load_pipeline("s2dit-tiny")
    return pipe, build_stages(pipe), recorded_inputs(pipe, num_chunks=1)


@pytest.fixture(scope="module")
def unseen(tiny):
    """Inputs recorded from a prompt (and seed) the calibration stream never saw, to score on."""
    from s2dit_deploy.quant.capture import EVAL_PROMPTS
    from s2dit_deploy.recording import record_inputs

    pipe = tiny[0]
    return record_inputs(pipe, EVAL_PROMPTS[1], 1, pipe.config.steps, 7)


def _fidelity(stage, runner, calls, n=2):
    refs, outs = {}, {}
    for named in calls[:n]:
        ref = stage.run_float(named)
        got = runner.run({k: v.numpy() for k, v in named.items()})
        for o in stage.output_names:
            refs.setdefault(o, []).append(ref[o].numpy().ravel())
            outs.setdefault(o, []).append(np.asarray(got[o]).ravel())
    return {o: psnr(np.concatenate(refs[o]), np.concatenate(outs[o])) for o in refs}


@pytest.mark.parametrize("name", ["text_encoder", "decoder"])
def test_onnx_cpu_stage_matches_float(tiny, tmp_path, name):
    _, stages, calls = tiny
    target = get_target("onnx")
    art = target.compile(stages[name], None, tmp_path, {})
    graph = art.metadata["graph"]
    assert graph["opset"] == 20 and "Erf" not in graph["ops"]
    assert graph["outputs"] == stages[name].output_names
    fid = _fidelity(stages[name], target.load(art, tmp_path), calls[name])
    assert min(fid.values()) >= 80.0, fid


def _mixed_plan(pipe, stage: str, target: str):
    """Every other layer int4 weights with 16-bit inputs, the rest int8 / 8-bit."""
    from s2dit_deploy.quant.plan import LayerQuant, QuantPlan
    from s2dit_deploy.quant.size import pipeline_layout

    names = sorted(pipeline_layout(pipe)[stage].layers)
    layers = {n: LayerQuant("int4-pc", "int16") if i % 2 else LayerQuant("int8-pc", "int8")
              for i, n in enumerate(names)}
    return QuantPlan("test-mixed", pipe.config.name, {stage: layers}, target)


def test_onnx_plan_gives_a_mixed_qdq_model_on_cpu(tiny, unseen, tmp_path):
    import onnx

    from s2dit_deploy.targets.onnx.qdq import plan_mismatches

    pipe, stages, calls = tiny
    target = get_target("onnx")
    plan = _mixed_plan(pipe, "dit_step", "onnx")
    art = target.compile(stages["dit_step"], plan, tmp_path, {"calibration": calls, "calibration_samples": 4})
    assert art.quant["plan"] == "test-mixed" and art.quant["quantized_nodes"] > 0
    # q / k / v share one input at 8 and 16 bits: each gets its planned width (a Q/DQ convert)
    assert plan_mismatches(tmp_path / art.files[0], plan, "dit_step") == []
    model = onnx.load(str(tmp_path / art.files[0]))
    elem = {i.name: i.data_type for i in model.graph.initializer}
    weights = {elem.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"}
    acts = {elem.get(n.input[2]) for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert {onnx.TensorProto.INT4, onnx.TensorProto.INT8} <= weights, weights
    assert {onnx.TensorProto.UINT8, onnx.TensorProto.UINT16} <= acts, acts
    fid = _fidelity(stages["dit_step"], target.load(art, tmp_path), unseen["dit_step"], n=2)
    assert fid["velocity"] >= 25.0, fid


@pytest.fixture(scope="module")
def qnn_ep():
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (QNN EP) is not installed")


def _compile_on_htp(stages, calls, tmp_path, stage: str, samples: int):
    """An onnx-qnn artifact for SM8750 that must be one whole HTP graph, and its runner."""
    target = get_target("onnx-qnn")
    art = target.compile(stages[stage], None, tmp_path,
                         {"soc": "SM8750", "calibration": calls, "calibration_samples": samples})
    part = art.metadata["partition"]
    assert part["delegated_fraction"] == 1.0 and part["fallbacks"] == [], part
    return art, target.load(art, tmp_path)


def test_onnx_qnn_qdq_decoder_under_emulation(tiny, unseen, tmp_path, qnn_ep):
    _, stages, calls = tiny
    art, runner = _compile_on_htp(stages, calls, tmp_path, "decoder", 2)
    assert art.files[0].endswith(".ctx.onnx") and art.metadata["soc_model"] == 69
    # no --quant: the documented default QDQ preset, recorded as built (never an fp16 HTP build)
    assert art.metadata["quant"] == "8a8w" and art.metadata["use_fp16"] is False
    fid = _fidelity(stages["decoder"], runner, unseen["decoder"], n=1)  # held out from calibration
    assert fid["video"] >= 25.0, fid


def test_onnx_qnn_errors(tiny, tmp_path, qnn_ep):
    _, stages, _ = tiny
    target = get_target("onnx-qnn")
    with pytest.raises(ValueError, match="SM8750"):
        target.compile(stages["decoder"], None, tmp_path, {"soc": "SM0000"})
    with pytest.raises(ValueError, match="calibration"):
        target.compile(stages["decoder"], None, tmp_path, {"soc": "SM8650"})
    with pytest.raises(ValueError, match="--quant"):  # precision is compute precision, not a preset
        target.compile(stages["decoder"], None, tmp_path, {"precision": "8a8w"})


def test_onnx_qnn_dit_step_whole_graph_on_htp(tiny, unseen, tmp_path, qnn_ep):
    """The DiT step with the QNN rewrites (host timestep features, explicit attention, conv taps)."""
    _, stages, calls = tiny
    art, runner = _compile_on_htp(stages, calls, tmp_path, "dit_step", 6)
    assert art.metadata["host_inputs"]["t"]["kind"] == "timestep_features"
    assert "Einsum" not in art.metadata["graph"]["ops"]
    fid = _fidelity(stages["dit_step"], runner, unseen["dit_step"][4:], n=2)  # held out from calibration
    assert fid["velocity"] >= 30.0, fid
