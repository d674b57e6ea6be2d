"""Self-forcing rollouts use the deployment path; one DMD iteration updates student and critic."""

import torch
from safetensors.torch import load_file

from s2dit_deploy.model_zoo.checkpoint import save_checkpoint
from s2dit_deploy.model_zoo.pipeline import Pipeline
from s2dit_deploy.model_zoo.registry import build_stage
from s2dit_deploy.model_zoo.sampler import FewStepSchedule
from s2dit_deploy.reference_training.configs import DistillConfig, load_config
from s2dit_deploy.reference_training.distill import self_forcing_rollout, train_distill
from s2dit_deploy.reference_training.models import model_config


def tiny_modules():
    mcfg = model_config("s2dit-tiny", 32, 64)
    torch.manual_seed(0)
    return mcfg, build_stage(mcfg, "dit").eval(), build_stage(mcfg, "text_encoder").eval()


def test_rollout_is_the_pipelines_streaming_path():
    mcfg, dit, te = tiny_modules()
    pipe = Pipeline(mcfg, te, dit, build_stage(mcfg, "decoder").eval())
    schedule = FewStepSchedule(steps=2)
    ctx = pipe.encode_prompt("a red circle moving left on a black background")
    with torch.no_grad():
        ours = self_forcing_rollout(dit, ctx, mcfg.chunk_latent_shape, 2, schedule, mcfg.stream,
                                    torch.Generator().manual_seed(3), grad=False)
        state, gen, chunks = pipe.start(), torch.Generator().manual_seed(3), []
        for _ in range(2):
            noise = torch.randn((1, *mcfg.chunk_latent_shape), generator=gen)
            chunks.append(pipe.denoise_chunk(noise, ctx, state, schedule, gen))
    assert torch.allclose(ours, torch.cat(chunks, dim=2), atol=1e-5)


def test_one_dmd_iteration_updates_student_and_critic(tmp_path):
    mcfg, dit, te = tiny_modules()
    save_checkpoint(tmp_path / "teacher" / "model", mcfg, {"dit": dit, "text_encoder": te})
    cfg = load_config(DistillConfig, None, out=str(tmp_path / "out"), teacher=str(tmp_path / "teacher"), codec="none",
                      steps=1, batch_size=2, rollout_chunks=2, checkpoint_every=1, student_steps=[2],
                      **{"data.height": 32, "data.width": 64})
    result = train_distill(cfg, progress=False)
    rec = result["history"][0]
    assert torch.isfinite(torch.tensor([rec["dmd"], rec["critic"]])).all() and rec["steps"] == 2
    teacher = dit.state_dict()
    for name in ("student", "critic"):
        trained = load_file(str(tmp_path / "out" / "train_state" / f"{name}.safetensors"))
        changed = sum(not torch.equal(trained[k], teacher[k]) for k in teacher if teacher[k].is_floating_point())
        assert changed > len(teacher) // 2, name
    assert (tmp_path / "out" / "model" / "dit.safetensors").is_file()
