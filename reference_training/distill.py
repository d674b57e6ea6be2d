"""Few-step streaming distillation (``s2dit-deploy train distill``): Self-Forcing rollouts + DMD.

Why this recipe (seed C.2 / Self-Forcing / DMD2):
- The student generates chunk after chunk with the *deployment* code path: ``S2DiT.step`` against
  the fixed-shape caches, the few-step re-noise schedule, and the commit pass at t = 0 whose cache
  entries later chunks attend to. Training on its own rollouts removes the train/test gap of
  teacher-forced training (exposure bias), which is what makes streaming chunks consistent.
- The gradient flows through the x0 prediction at one randomly chosen exit step of each chunk
  (earlier steps and the commit pass run without grad), as in Self-Forcing.
- The objective is distribution matching: real score = the frozen pretrained teacher (with
  classifier-free guidance), fake score = a critic initialised from the teacher and trained by flow
  matching on the student's samples. One student is trained across the 4-, 2- and 1-step schedules
  (their timesteps are nested), so the same weights serve ``--steps 4|2|1``.
The objective is data-free: only captions are needed.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model_zoo.checkpoint import read_config, save_checkpoint
from ..model_zoo.registry import load_stage
from ..model_zoo.sampler import FewStepSchedule, add_noise
from .codec_train import make_dataset
from .common import (EMA, append_jsonl, barrier, frozen, init_distributed, load_training_state,
                     mean_across_ranks, rank_slice, save_training_state, step_generator)
from .configs import DistillConfig, write_config
from .data import SyntheticVideoDataset, caption
from .losses import critic_loss, dmd_loss
from .models import token_ids

log = logging.getLogger(__name__)


def allreduce_grads(module: torch.nn.Module) -> None:
    """Average gradients over ranks (what DDP does; used where the model is called via ``step``)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        world = torch.distributed.get_world_size()
        for p in module.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world


def batch_captions(data, step: int, batch_size: int) -> list[str]:
    """Captions of the global batch of ``step`` (synthetic: parameters only, nothing rendered)."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        if isinstance(data, SyntheticVideoDataset):
            rng = np.random.default_rng([data.seed, i])
            out.append(caption(data.params(rng), rng, data.caption_drop))
        else:
            out.append(data[i % len(data)]["caption"])
    return out


def self_forcing_rollout(dit, context: torch.Tensor, chunk_shape: tuple, chunks: int, schedule: FewStepSchedule,
                         stream, generator: torch.Generator, exit_steps: list[int] | None = None,
                         grad: bool = True) -> torch.Tensor:
    """Generate ``chunks`` chunks autoregressively with the deployment caches; returns x0 (B, C, F, h, w).

    Chunk k stops at ``exit_steps[k]`` (default: the last step) and returns that step's x0
    prediction, the only one that carries gradient. The clean chunk is then re-run at t = 0 and
    committed to the cache, exactly as ``Pipeline.denoise_chunk`` does.
    """
    b = context.shape[0]
    ts = schedule.timesteps
    exits = exit_steps or [len(ts) - 1] * chunks
    cache = dit.init_cache(b, chunk_shape[-2:], stream, dtype=context.dtype)
    offset, outputs = 0, []
    for k in range(chunks):
        x = torch.randn((b, *chunk_shape), generator=generator)
        for i, t in enumerate(ts[: exits[k] + 1]):
            with torch.set_grad_enabled(grad and i == exits[k]):
                v = dit.step(x, t, context, cache, offset)[0]
                x0 = x - t * v
            if i < exits[k]:
                if schedule.rule == "euler":  # multi-step ODE sampling of the teacher (evaluation)
                    x = (x + (ts[i + 1] - t) * v).detach()
                else:
                    x = add_noise(x0.detach(), torch.randn(x.shape, generator=generator), ts[i + 1])
        outputs.append(x0)
        with torch.no_grad():
            _, entries = dit.step(x0.detach(), 0.0, context, cache, offset)
        cache = dit.push_cache(cache, entries)
        offset += chunk_shape[1]
    return torch.cat(outputs, dim=2)


def guided_velocity(dit, xt, t, ctx, ctx_uncond, guidance: float, chunk_frames: int, window: int) -> torch.Tensor:
    """Classifier-free guided teacher velocity v_u + g (v_c - v_u), both halves in one batch."""
    if guidance == 1.0:
        return dit(xt, t, ctx, chunk_frames, window)
    v = dit(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([ctx, ctx_uncond]), chunk_frames, window)
    v_c, v_u = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


def train_distill(cfg: DistillConfig, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    out = Path(cfg.out)
    if rank == 0:
        write_config(out, cfg)
    teacher_dir = Path(cfg.teacher) / "model" if (Path(cfg.teacher) / "model").is_dir() else Path(cfg.teacher)
    mcfg = read_config(teacher_dir).with_resolution(cfg.data.height, cfg.data.width)
    teacher = load_stage(mcfg, teacher_dir, "dit").requires_grad_(False)
    text_encoder = load_stage(mcfg, teacher_dir, "text_encoder").requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    critic = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = EMA(student, cfg.ema_decay)
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=(0.0, 0.99), weight_decay=0.0)
    start, history = 0, []
    state_dir = out / "train_state"
    if cfg.resume and (state_dir / "state.json").is_file():
        scalars = load_training_state(state_dir, {"student": student, "critic": critic, "ema": ema.shadow},
                                      {"student": opt_g, "critic": opt_c})
        start, ema.updates, history = scalars["step"], scalars["ema_updates"], scalars["history"]
        log.info("resumed distillation at step %d", start)
    data = make_dataset(cfg.data)
    chunk_shape = mcfg.chunk_latent_shape
    cf, window = mcfg.stream.chunk_frames, mcfg.stream.window_chunks
    with torch.no_grad():
        uncond = text_encoder(token_ids([""], mcfg))
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="distill", disable=not progress or rank != 0, initial=start, total=cfg.steps)
    for step in bar:
        g = step_generator(cfg.seed, step, rank + 1)  # rollout noise: each rank its own samples
        gs = step_generator(cfg.seed, step)  # shared choices (schedule, exits)
        pick = random.Random(cfg.seed * 7919 + step)
        schedule = FewStepSchedule(steps=pick.choice(cfg.student_steps), shift=cfg.shift)
        exits = [pick.randrange(schedule.steps) for _ in range(cfg.rollout_chunks)]
        captions = batch_captions(data, step, cfg.batch_size)[rank * (cfg.batch_size // world):][: cfg.batch_size // world]
        with torch.no_grad():
            ctx = text_encoder(token_ids(captions, mcfg))
        ctx_u = uncond.expand_as(ctx)
        b = ctx.shape[0]
        # ---- generator: DMD on its own streamed rollout ----
        x = self_forcing_rollout(student, ctx, chunk_shape, cfg.rollout_chunks, schedule, mcfg.stream, g, exits)
        frames = x.shape[2]
        t = rank_slice(cfg.min_t + (cfg.max_t - cfg.min_t) * torch.rand(cfg.batch_size, generator=gs), rank, world)
        t = t[:, None].expand(b, frames)
        noise = torch.randn(x.shape, generator=g)
        xt = (1 - t[:, None, :, None, None]) * x.detach() + t[:, None, :, None, None] * noise
        with torch.no_grad():
            tb = t[:, None, :, None, None]
            real_x0 = xt - tb * guided_velocity(teacher, xt, t, ctx, ctx_u, cfg.guidance, cf, window)
            fake_x0 = xt - tb * critic(xt, t, ctx, cf, window)
        loss_g = dmd_loss(x, real_x0, fake_x0)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        allreduce_grads(student)
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt_g.step()
        ema.update(student)
        # ---- critic: flow matching on the student's samples (fake score) ----
        x_fake = x.detach()
        for k in range(cfg.critic_steps):
            if k > 0:
                with torch.no_grad():
                    x_fake = self_forcing_rollout(student, ctx, chunk_shape, cfg.rollout_chunks, schedule,
                                                  mcfg.stream, g, grad=False)
            tc = torch.rand((b, 1), generator=g).clamp(cfg.min_t, cfg.max_t).expand(b, frames)
            with frozen(student):
                loss_c = critic_loss(lambda xt_, tt: critic(xt_, tt, ctx, cf, window), x_fake,
                                     torch.randn(x.shape, generator=g), tc)
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            allreduce_grads(critic)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
            opt_c.step()
        record = {"step": step, "dmd": mean_across_ranks(loss_g), "critic": mean_across_ranks(loss_c),
                  "steps": schedule.steps}
        history.append(record)
        bar.set_postfix(dmd=f"{record['dmd']:.4f}", critic=f"{record['critic']:.4f}")
        if rank == 0 and step % cfg.log_every == 0:
            log.info("distill step %d (%d-step) dmd %.5f critic %.5f", step, schedule.steps, record["dmd"], record["critic"])
            append_jsonl(out / "log.jsonl", {**record, "time": time.perf_counter() - t0})
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_training_state(state_dir, {"student": student, "critic": critic, "ema": ema.shadow},
                                {"student": opt_g, "critic": opt_c},
                                {"step": step + 1, "ema_updates": ema.updates, "history": history})
            shadow = copy.deepcopy(student)
            ema.copy_to(shadow)
            save_checkpoint(out / "model", mcfg, {"dit": shadow, "text_encoder": text_encoder})
        barrier()
    return {"out": str(out), "steps": cfg.steps, "start": start, "history": history,
            "seconds": time.perf_counter() - t0}
