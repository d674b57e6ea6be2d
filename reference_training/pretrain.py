"""Flow-matching pretraining of S2DiT with its text encoder (``s2dit-deploy train pretrain``).

Rectified flow with logit-normal timesteps, block-causal over chunks with the deployment window,
and an independent t per chunk (diffusion forcing): some past chunks are fully clean (t = 0), as
the streaming pipeline's committed context is, so the model learns clean-context conditioning.
Runs unchanged under ``torchrun`` (DDP; each rank takes its slice of the same global batch).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model_zoo.checkpoint import save_checkpoint
from .codec_train import make_dataset
from .common import (EMA, append_jsonl, barrier, init_distributed, load_training_state, lr_at,
                     mean_across_ranks, rank_slice, save_training_state, step_generator, wrap_ddp)
from .configs import PretrainConfig, write_config
from .data import global_batch
from .losses import flow_matching_loss, logit_normal_t
from .models import build_text_to_video, get_codec, model_config, token_ids

log = logging.getLogger(__name__)


def chunk_timesteps(cfg: PretrainConfig, batch: int, chunks: int, g: torch.Generator) -> torch.Tensor:
    """Per-frame t (B, F): one logit-normal t per chunk; non-final chunks are clean with some probability."""
    t = logit_normal_t((batch, chunks), g, cfg.logit_mean, cfg.logit_std)
    clean = torch.rand((batch, chunks), generator=g) < cfg.clean_context_prob
    clean[:, -1] = False
    t = torch.where(clean, torch.zeros_like(t), t)
    return t.repeat_interleave(cfg.chunk_frames, dim=1)


def pretrain_step_inputs(cfg: PretrainConfig, data, codec, step: int, rank: int, world: int, mcfg):
    """This rank's (x0, noise, t, token ids) of ``step``; noise and t are drawn for the global batch."""
    batch = global_batch(data, step, cfg.batch_size, rank, world)
    with torch.no_grad():
        x0 = codec.encode(batch["video"])
    g = step_generator(cfg.seed, step)
    b, c, f, h, w = x0.shape
    noise = rank_slice(torch.randn((cfg.batch_size, c, f, h, w), generator=g), rank, world)
    t = rank_slice(chunk_timesteps(cfg, cfg.batch_size, f // cfg.chunk_frames, g), rank, world)
    drop = rank_slice(torch.rand(cfg.batch_size, generator=g) < cfg.text_dropout, rank, world)
    captions = ["" if d else cap for cap, d in zip(batch["caption"], drop.tolist())]
    return x0, noise, t, token_ids(captions, mcfg)


def train_pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    out = Path(cfg.out)
    if rank == 0:
        write_config(out, cfg)
    mcfg = model_config(cfg.model, cfg.data.height, cfg.data.width)
    net = build_text_to_video(mcfg, cfg.seed, cfg.chunk_frames, cfg.window).to(device)
    codec = get_codec(cfg.codec).to(device)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW([
        {"params": net.dit.parameters(), "lr": cfg.lr, "base_lr": cfg.lr},
        {"params": net.text_encoder.parameters(), "lr": cfg.text_lr, "base_lr": cfg.text_lr},
    ], betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    start, history = 0, []
    state_dir = out / "train_state"
    if cfg.resume and (state_dir / "state.json").is_file():
        scalars = load_training_state(state_dir, {"net": net, "ema": ema.shadow}, {"net": opt})
        start, ema.updates, history = scalars["step"], scalars["ema_updates"], scalars["history"]
        log.info("resumed pretraining at step %d", start)
    model = wrap_ddp(net, device)
    data = make_dataset(cfg.data)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="pretrain", disable=not progress or rank != 0,
               initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, group["base_lr"], cfg.warmup)
        x0, noise, t, ids = pretrain_step_inputs(cfg, data, codec, step, rank, world, mcfg)
        x0, noise, t, ids = x0.to(device), noise.to(device), t.to(device), ids.to(device)
        loss = flow_matching_loss(lambda xt, tt: model(xt, tt, ids), x0, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(net)
        value = mean_across_ranks(loss)
        history.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if rank == 0 and step % cfg.log_every == 0:
            log.info("pretrain step %d loss %.5f", step, value)
            append_jsonl(out / "log.jsonl", {"step": step, "loss": value, "time": time.perf_counter() - t0})
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_training_state(state_dir, {"net": net, "ema": ema.shadow}, {"net": opt},
                                {"step": step + 1, "ema_updates": ema.updates, "history": history})
            export_ema(out / "model", mcfg, net, ema)
        barrier()
    return {"out": str(out), "steps": cfg.steps, "start": start, "losses": history,
            "final_loss": history[-1] if history else None, "seconds": time.perf_counter() - t0,
            "world": world}


def export_ema(folder: Path, mcfg, net, ema: EMA) -> None:
    """The EMA weights as a model checkpoint folder (config.json, dit and text_encoder safetensors)."""
    import copy

    shadow = copy.deepcopy(net)
    ema.copy_to(shadow)
    save_checkpoint(folder, mcfg, {"dit": shadow.dit, "text_encoder": shadow.text_encoder})
