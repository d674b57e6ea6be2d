"""An fp16 checkpoint (as `s2dit-deploy init` writes it) goes through the one compile path: the
Core ML DiT is converted chunk by chunk from fp32 copies of one chunk at a time, validates against
the fp32-computed float model, and a compile above the memory bound stops before any work."""

import pytest
import torch

from s2dit_deploy.compiler import compile_model
from s2dit_deploy.memory_budget import MemoryBudgetError
from s2dit_deploy.model_zoo.init_weights import init_checkpoint
from s2dit_deploy.model_zoo.registry import get_card

TINY = get_card("s2dit-tiny").config


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny16"
    init_checkpoint(TINY, folder, seed=3, dtype="fp16")
    return folder


def test_fp16_checkpoint_compiles_in_chunks_and_validates(fp16_checkpoint, tmp_path):
    pytest.importorskip("coremltools")
    from s2dit_deploy.fidelity import validate

    out = tmp_path / "b"
    bundle = compile_model("s2dit-tiny", "coreml", checkpoint=fp16_checkpoint, stages=("dit_step",),
                           out_dir=out, progress=False, chunks=2)
    art = bundle.artifacts["dit_step"]
    assert len(art.files) == 2 and len(art.metadata["chunks"]) == 2
    assert bundle.model["checkpoint"]["source"] == "user"
    mem = bundle.info["memory_estimate"]
    assert mem["weights_dtype"]["dit"] == "float16" and mem["estimated_peak_gib"] < mem["bound_gib"]
    report = validate(out, checkpoint=fp16_checkpoint, num_chunks=1, steps=1, max_calls=1, stream=False)
    stage = report["stages"]["dit_step"]
    assert stage["calls"] == 1 and report["stream"] is None and report["passed"]
    assert min(stage["psnr_db"].values()) > 40.0, stage["psnr_db"]


def test_fp16_checkpoint_float_model_keeps_half_storage(fp16_checkpoint):
    from s2dit_deploy.model_zoo.pipeline import load_pipeline
    from s2dit_deploy.stages import build_stages

    pipe = load_pipeline("s2dit-tiny", fp16_checkpoint)
    assert {p.dtype for p in pipe.dit.parameters()} == {torch.float16}
    stage = build_stages(pipe, ("dit_step",))["dit_step"]
    assert all(s.dtype == "float32" for s in stage.outputs)  # the contract is fp32 whatever the storage


def test_memory_bound_stops_before_any_work(fp16_checkpoint, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(MemoryBudgetError, match=r"needs an estimated .* above the bound"):
        compile_model("s2dit-tiny", "coreml", checkpoint=fp16_checkpoint, out_dir=out, progress=False,
                      memory_bound_bytes=1 << 20)
    assert not out.exists()
