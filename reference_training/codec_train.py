"""Train the latent codec (``s2dit-deploy train codec``): VAE loss on synthetic clips, then latent stats."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .codec import CodecConfig, VideoCodec, codec_loss, fit_latent_stats, load_codec, save_codec
from .common import (append_jsonl, init_distributed, load_training_state, lr_at, mean_across_ranks,
                     save_training_state, step_generator, wrap_ddp)
from .configs import CodecTrainConfig, DataConfig, write_config
from .data import SyntheticVideoDataset, VideoFolderDataset, global_batch

log = logging.getLogger(__name__)


def make_dataset(cfg: DataConfig):
    if cfg.video_folder:
        return VideoFolderDataset(cfg.video_folder, cfg.height, cfg.width, cfg.chunks)
    return SyntheticVideoDataset(cfg.height, cfg.width, cfg.chunks, cfg.seed, caption_drop=cfg.caption_drop)


def train_codec(cfg: CodecTrainConfig, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    out = Path(cfg.out)
    write_config(out, cfg) if rank == 0 else None
    torch.manual_seed(cfg.seed)
    codec = VideoCodec(CodecConfig(cfg.channels)).to(device)
    model = wrap_ddp(codec, device)
    opt = torch.optim.AdamW(codec.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    start, history = 0, []
    if (out / "train_state" / "state.json").is_file():
        start = load_training_state(out / "train_state", {"codec": codec}, {"codec": opt})["step"]
        log.info("resumed codec training at step %d", start)
    data = make_dataset(cfg.data)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="codec", disable=not progress or rank != 0, initial=start, total=cfg.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        video = global_batch(data, step, cfg.batch_size, rank, world)["video"].to(device)
        loss, parts = codec_loss(model.module if hasattr(model, "module") else model, video, cfg.kl_weight,
                                 step_generator(cfg.seed, step, rank))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            for p in codec.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        value = mean_across_ranks(loss)
        history.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if step % cfg.log_every == 0 and rank == 0:
            log.info("codec step %d loss %.5f l1 %.5f kl %.3f", step, value, parts["l1"], parts["kl"])
            append_jsonl(out / "log.jsonl", {"step": step, "loss": value, **parts, "time": time.perf_counter() - t0})
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_training_state(out / "train_state", {"codec": codec}, {"codec": opt}, {"step": step + 1})
            save_codec(out, codec)
    stats_data = SyntheticVideoDataset(cfg.data.height, cfg.data.width, cfg.data.chunks, seed=cfg.data.seed + 7919)
    codec.eval()
    fit_latent_stats(codec, (global_batch(stats_data, i, cfg.batch_size)["video"] for i in range(cfg.stats_batches)))
    if rank == 0:
        save_codec(out, codec)
    psnr = evaluate_codec(codec, stats_data, cfg.batch_size)
    return {"out": str(out), "steps": cfg.steps, "final_loss": history[-1] if history else None,
            "psnr": psnr, "seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in codec.parameters())}


@torch.no_grad()
def evaluate_codec(codec: VideoCodec, data, batch_size: int = 4, batches: int = 4) -> float:
    from .metrics import psnr

    vals = []
    for i in range(batches):
        v = global_batch(data, 1000 + i, batch_size)["video"]
        vals.append(psnr(codec.decode(codec.encode(v)), v))
    return sum(vals) / len(vals)


__all__ = ["train_codec", "load_codec", "make_dataset", "evaluate_codec"]
