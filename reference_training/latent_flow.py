"""``s2dit-deploy train latent-flow``: train a DiT of any shape on a latent set.

Three uses, one loop:
- the all-self-attention teacher of the sandwich search: ``dit: {"layout": "FFFFFF"}``, initialised
  from the bundled model (``init``) and distilled from it (``kd_from``: velocity matching);
- a wider supernet to prune (flow matching);
- the directly trained baselines the pruned model is compared with (Taming-DiT Table 4: a shallow
  and a narrow model of the same size, trained for the same steps).

The text encoder and decoder are the base model's, frozen (the set caches the text tokens); the
output ``model/`` folder is a complete checkpoint that ``compile`` takes as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model_zoo.checkpoint import save_checkpoint
from ..model_zoo.config import DiTConfig
from ..model_zoo.dit import S2DiT
from ..model_zoo.registry import load_stage, resolve
from .arch_eval import fvd_proxy, heldout_loss
from .common import (EMA, append_jsonl, barrier, check_batch_split, ddp_loss, init_distributed, is_main_process,
                     load_training_state, lr_at, mean_across_ranks, save_training_state)
from .configs import LatentFlowConfig, RecipeConfigError, write_config
from .latent_set import ensure_sets, noised_batch
from .losses import flow_matching_loss, velocity_kd_loss

log = logging.getLogger(__name__)


def dit_config_with(base: DiTConfig, changes: dict) -> DiTConfig:
    """The base DiT config with ``changes``; an unknown or bad field names itself."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(DiTConfig)}
    if unknown:
        raise RecipeConfigError(f"dit: unknown DiT config fields {sorted(unknown)}")
    return DiTConfig.from_dict({**base.to_dict(), **changes})


@torch.no_grad()
def inherit_weights(target: S2DiT, source: S2DiT) -> dict:
    """Copy every source tensor into the target tensor of the same name and shape; a group whose
    branch differs (S in one, L/F in the other) takes the other branch's block. Returns counts."""
    src = source.state_dict()
    dst = target.state_dict()
    copied = 0
    for name, value in dst.items():
        cands = [name]
        if name.startswith("sandwich.groups."):
            cands += [name.replace(".high.", ".low."), name.replace(".low.", ".high.")]
        for c in cands:
            if c in src and src[c].shape == value.shape:
                value.copy_(src[c].to(value.dtype))
                copied += 1
                break
    target.load_state_dict(dst)
    return {"copied": copied, "total": len(dst)}


def export_model(folder: Path, base_config, dit: S2DiT, text_encoder, decoder) -> Path:
    """A full checkpoint (config.json + dit / text_encoder / decoder safetensors) of a trained DiT."""
    cfg = dataclasses.replace(base_config, dit=dit.cfg)
    return save_checkpoint(folder, cfg, {"dit": dit, "text_encoder": text_encoder, "decoder": decoder})


def evaluate_model(config, dit, text_encoder, decoder, heldout, cfg) -> dict:
    """Held-out eval loss, plus the FVD proxy when the config names a classifier."""
    result = {"eval_loss": round(heldout_loss(dit, heldout, cfg.chunk_frames, cfg.window), 6)}
    if getattr(cfg, "classifier", None):
        result["fvd"] = fvd_proxy(config, text_encoder, dit, decoder, cfg.classifier, chunks=cfg.chunks)
    return result


def latent_flow_objective(dit, teacher, cfg: LatentFlowConfig):
    """Flow matching, or velocity KD from ``teacher``, on one batch: the forward of the DDP loss module."""

    def loss(x0, ctx, noise, t):
        model = lambda xt, tt: dit(xt, tt, ctx, cfg.chunk_frames, cfg.window)  # noqa: E731
        if teacher is None:
            return flow_matching_loss(model, x0, noise, t)
        xt = (1 - t[:, None, :, None, None]) * x0 + t[:, None, :, None, None] * noise
        with torch.no_grad():
            target = teacher(xt, t, ctx, cfg.chunk_frames, cfg.window)
        return velocity_kd_loss(model(xt, t), target, t)

    return loss


def train_latent_flow(cfg: LatentFlowConfig, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    check_batch_split(cfg.batch_size, world, "LatentFlowConfig")
    main = is_main_process()
    out = Path(cfg.out)
    base_config, base_folder = resolve(cfg.model)
    dit_cfg = dit_config_with(base_config.dit, cfg.dit)  # validated before any work
    if main:
        write_config(out, cfg)
    te = load_stage(base_config, base_folder, "text_encoder").float()
    decoder = load_stage(base_config, base_folder, "decoder").float()
    train, heldout, sets = ensure_sets(out, cfg.model, cfg.latents, cfg.heldout, cfg.count, cfg.heldout_count,
                                       cfg.chunks, cfg.seed, progress and main)
    torch.manual_seed(cfg.seed)
    dit = S2DiT(dit_cfg)
    inherited = None
    if cfg.init:
        init_cfg, init_folder = resolve(cfg.init)
        inherited = inherit_weights(dit, load_stage(init_cfg, init_folder, "dit").float())
    teacher = None
    if cfg.kd_from:
        kd_cfg, kd_folder = resolve(cfg.kd_from)
        teacher = load_stage(kd_cfg, kd_folder, "dit").float().eval().requires_grad_(False).to(device)
    ema = EMA(dit, cfg.ema_decay)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state_dir, start, history = out / "train_state", 0, []
    if cfg.resume and (state_dir / "state.json").is_file():
        scalars = load_training_state(state_dir, {"dit": dit, "ema": ema.shadow}, {"dit": opt})
        start, ema.updates, history = scalars["step"], scalars["ema_updates"], scalars["history"]
        log.info("resumed latent-flow at step %d", start)
    dit.to(device)
    ema.shadow = {k: v.to(device) for k, v in ema.shadow.items()}
    objective = ddp_loss(latent_flow_objective(dit, teacher, cfg), device, dit=dit)
    t0 = time.perf_counter()
    dit.train()
    for step in tqdm(range(start, cfg.steps), desc="latent-flow", disable=not progress or not main, initial=start,
                     total=cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        loss = objective(*noised_batch(cfg, train, step, rank, world, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(dit)
        history.append(mean_across_ranks(loss))
        if main and step % cfg.log_every == 0:
            append_jsonl(out / "log.jsonl", {"step": step, "loss": history[-1], "time": time.perf_counter() - t0})
        if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_training_state(state_dir, {"dit": dit, "ema": ema.shadow}, {"dit": opt},
                                {"step": step + 1, "ema_updates": ema.updates, "history": history})
        barrier()
    if not main:  # rank 0 evaluates and writes; the others are done
        return {"out": str(out), "rank": rank, "world": world, "steps": cfg.steps, "start": start}
    final = copy.deepcopy(dit).cpu()
    final.load_state_dict({k: v.cpu() for k, v in ema.shadow.items()})
    final.eval()
    export_model(out / "model", base_config, final, te, decoder)
    ev = evaluate_model(base_config, final, te, decoder, heldout, cfg)
    params = sum(p.numel() for p in final.parameters())
    return {"out": str(out), "model": str(out / "model"), "layout": dit_cfg.layout, "dit_params": params,
            "steps": cfg.steps, "start": start, "final_loss": history[-1] if history else None,
            "inherited": inherited, "kd_from": cfg.kd_from, "world": world, "losses": history, **sets, **ev,
            "seconds": round(time.perf_counter() - t0, 1)}
