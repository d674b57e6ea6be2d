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


def test_onnx_rejects_plans(tiny, tmp_path):
    _, stages, _ = tiny
    with pytest.raises(NotImplementedError):
        get_target("onnx").compile(stages["decoder"], object(), tmp_path, {})


@pytest.fixture(scope="module")
def qnn_ep():
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (QNN EP) is not installed")


def test_onnx_qnn_qdq_decoder_under_emulation(tiny, tmp_path, qnn_ep):
    _, stages, calls = tiny
    target = get_target("onnx-qnn")
    art = target.compile(stages["decoder"], None, tmp_path,
                         {"soc": "SM8750", "calibration": calls, "calibration_samples": 2})
    part = art.metadata["partition"]
    assert part["delegated_fraction"] == 1.0 and part["fallbacks"] == [], part
    assert art.files[0].endswith(".ctx.onnx") and art.metadata["soc_model"] == 69
    fid = _fidelity(stages["decoder"], target.load(art, tmp_path), calls["decoder"], n=1)
    assert fid["video"] >= 25.0, fid


def test_onnx_qnn_errors(tiny, tmp_path, qnn_ep):
    _, stages, _ = tiny
    target = get_target("onnx-qnn")
    with pytest.raises(ValueError, match="SM8750"):
        target.compile(stages["decoder"], None, tmp_path, {"soc": "SM0000"})
    with pytest.raises(ValueError, match="calibration"):
        target.compile(stages["decoder"], None, tmp_path, {"soc": "SM8650"})
