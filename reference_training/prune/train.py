"""``s2dit-deploy prune``: KD-guided tri-level pruning of a trained supernet (Taming-DiT Sec. 4.2).

Phase 1 (``mask_steps``): the student is the supernet with learnable masks (``masks``); masks,
weights and the KD aligners train together on Eq. 6, L_flow + alpha * L_distill, where L_distill
is Eq. 5 over the block groups' outputs against the frozen supernet. Phase 2 (``finetune_steps``):
the final masks become a dense compact model (``dense``), fine-tuned on the same loss. The result
``model/`` is a plain checkpoint every target compiles; ``result/prune.json`` has the shape, the
chosen units, parameters and held-out scores.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...model_zoo.checkpoint import atomic_folder
from ...model_zoo.registry import load_stage, resolve
from ..common import (append_jsonl, barrier, check_batch_split, ddp_loss, init_distributed, is_main_process,
                      load_training_state, mean_across_ranks, save_training_state, step_generator)
from ..configs import PruneConfig, write_config
from ..latent_flow import evaluate_model, export_model
from ..latent_set import ensure_sets, noised_batch
from ..losses import feature_alignment_loss, flow_matching_loss, pruning_loss
from .dense import to_dense
from .masks import PruneMasks, PruneTargetError, block_list, check_shape, masked
from .plan import plan_shape

log = logging.getLogger(__name__)


def group_outputs(dit) -> list[nn.Module]:
    """The last block of each group: its output is the group's output feature y_i of Eq. 5."""
    last: dict[int, nn.Module] = {}
    for n, _branch, _j, blk in block_list(dit):
        last[n] = blk
    return [last[n] for n in sorted(last)]


@contextlib.contextmanager
def capture(blocks: list[nn.Module]):
    """Collect each block's output (after any mask hook registered before) during a forward."""
    feats: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: feats.append(out)) for b in blocks]
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def aligners(dim_s: int, dim_t: int, count: int) -> nn.ModuleList:
    """Eq. 5's F_i: affine maps from student to teacher width, initialised to identity (or a
    truncated identity when the widths differ)."""
    maps = nn.ModuleList(nn.Linear(dim_s, dim_t) for _ in range(count))
    with torch.no_grad():
        for m in maps:
            m.weight.zero_()
            m.weight[: min(dim_s, dim_t), : min(dim_s, dim_t)] = torch.eye(min(dim_s, dim_t))
            m.bias.zero_()
    return maps


def tau_at(cfg: PruneConfig, step: int) -> float:
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.mask_steps - 1))


def eq6_loss(cfg, student, teacher, maps, t_blocks, s_blocks, x0, ctx, noise, t, masks=None):
    """L_flow (student) + alpha * L_distill (Eq. 5 over the group outputs), one batch."""
    xt = (1 - t[:, None, :, None, None]) * x0 + t[:, None, :, None, None] * noise
    with torch.no_grad(), capture(t_blocks) as yt:
        teacher(xt, t, ctx, cfg.chunk_frames, cfg.window)
    ctx_mgr = masked(student, masks) if masks is not None else contextlib.nullcontext()
    with ctx_mgr, capture(s_blocks) as ys:
        flow = flow_matching_loss(lambda a, b: student(a, b, ctx, cfg.chunk_frames, cfg.window), x0, noise, t)
    distill = feature_alignment_loss(yt, ys, maps)
    return pruning_loss(flow, distill, cfg.alpha), flow, distill


def _train_phase(name, cfg, steps, student, teacher, maps, train, out, opt, extra_modules, masks_fn, progress, dist_ctx):
    """One resumable phase of Eq. 6 training; returns the loss history (means over all processes)."""
    rank, world, device = dist_ctx
    main = is_main_process()
    state_dir = out / f"train_state_{name}"
    modules = {"student": student, "aligners": maps, **extra_modules}
    start, history = 0, []
    if cfg.resume and (state_dir / "state.json").is_file():
        scalars = load_training_state(state_dir, modules, {"opt": opt})
        start, history = scalars["step"], scalars["history"]
        log.info("resumed prune %s at step %d", name, start)
    t_blocks, s_blocks = group_outputs(teacher), group_outputs(student)

    def loss(x0, ctx, noise, t, step):
        return eq6_loss(cfg, student, teacher, maps, t_blocks, s_blocks, x0, ctx, noise, t, masks_fn(step))

    objective = ddp_loss(loss, device, **modules)
    t0 = time.perf_counter()
    student.train()
    for step in tqdm(range(start, steps), desc=f"prune {name}", disable=not progress or not main, initial=start,
                     total=steps):
        batch = noised_batch(cfg, train, step + (0 if name == "masks" else cfg.mask_steps), rank, world, device)
        loss_v, flow, distill = objective(*batch, step)
        opt.zero_grad(set_to_none=True)
        loss_v.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        history.append([mean_across_ranks(v) for v in (loss_v, flow, distill)])
        if main and step % cfg.log_every == 0:
            append_jsonl(out / "log.jsonl", {"phase": name, "step": step, "loss": history[-1][0], "flow": history[-1][1],
                                             "distill": history[-1][2], "time": time.perf_counter() - t0})
        if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
            save_training_state(state_dir, modules, {"opt": opt}, {"step": step + 1, "history": history})
        barrier()
    return history


def train_prune(cfg: PruneConfig, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    check_batch_split(cfg.batch_size, world, "PruneConfig")
    main = is_main_process()
    t_cfg, t_folder = resolve(cfg.teacher)
    if t_cfg.dit.search:
        raise PruneTargetError(f"{cfg.teacher}: prune needs a fixed-layout supernet, not a search model")
    shape = (plan_shape(t_cfg.dit, cfg.target_params, cfg.ffn_group)[0] if cfg.target_params
             else check_shape(t_cfg.dit, cfg.keep_blocks, cfg.keep_heads, cfg.keep_ffn, cfg.ffn_group))
    out = Path(cfg.out)
    if main:
        write_config(out, cfg)
    t0 = time.perf_counter()
    teacher = load_stage(t_cfg, t_folder, "dit").float().eval().requires_grad_(False)
    te = load_stage(t_cfg, t_folder, "text_encoder").float()
    decoder = load_stage(t_cfg, t_folder, "decoder").float()
    train, heldout, sets = ensure_sets(out, cfg.teacher, cfg.latents, cfg.heldout, cfg.count, cfg.heldout_count,
                                       cfg.chunks, cfg.seed, progress and main)
    student = copy.deepcopy(teacher).requires_grad_(True)
    masks = PruneMasks(student, shape)
    maps = aligners(t_cfg.dit.dim, t_cfg.dit.dim, t_cfg.dit.num_groups)
    for m in (teacher, student, masks, maps):
        m.to(device)
    opt = torch.optim.AdamW([{"params": list(student.parameters()), "lr": cfg.lr},
                             {"params": list(masks.parameters()), "lr": cfg.mask_lr},
                             {"params": list(maps.parameters()), "lr": cfg.aligner_lr}], betas=(0.9, 0.99), weight_decay=0.0)
    start_scores = {k: v.detach().clone() for k, v in masks.state_dict().items()}
    h1 = _train_phase("masks", cfg, cfg.mask_steps, student, teacher, maps, train, out, opt, {"masks": masks},
                      lambda s: masks.sample(tau_at(cfg, s), step_generator(cfg.seed, s, stream=7)), progress,
                      (rank, world, device))
    final_masks = masks.hard()
    dense = to_dense(student.eval(), final_masks).requires_grad_(True).to(device)
    d_maps = aligners(dense.cfg.dim, t_cfg.dit.dim, t_cfg.dit.num_groups).to(device)
    d_maps.load_state_dict(maps.state_dict())
    opt2 = torch.optim.AdamW([{"params": list(dense.parameters()), "lr": cfg.lr},
                              {"params": list(d_maps.parameters()), "lr": cfg.aligner_lr}], betas=(0.9, 0.99), weight_decay=0.0)
    h2 = _train_phase("dense", cfg, cfg.finetune_steps, dense, teacher, d_maps, train, out, opt2, {},
                      lambda s: None, progress, (rank, world, device))
    if not main:  # rank 0 evaluates and writes; the others are done
        return {"out": str(out), "rank": rank, "world": world, "steps": {"masks": cfg.mask_steps, "dense": cfg.finetune_steps}}
    dense.eval().cpu()
    teacher.cpu()
    final_masks = {k: v.cpu() for k, v in final_masks.items()}
    export_model(out / "model", t_cfg, dense, te, decoder)
    blocks = block_list(teacher)
    kept = {"blocks": [f"groups.{n}.{b}.{j}" for i, (n, b, j, _) in enumerate(blocks) if final_masks["blocks"][i] > 0.5],
            "heads": torch.nonzero(final_masks["heads"] > 0.5)[:, 1].reshape(len(blocks), -1).tolist(),
            "cross_heads": torch.nonzero(final_masks["cross_heads"] > 0.5)[:, 1].reshape(len(blocks), -1).tolist()}
    moved = {k: float((masks.state_dict()[k] - v).abs().max().cpu()) for k, v in start_scores.items()}
    result = {
        "out": str(out), "model": str(out / "model"), "shape": shape.as_dict(),
        "config": {k: v for k, v in dense.cfg.to_dict().items() if k in ("num_heads", "attn_dim", "ffn_dim", "group_blocks")},
        "dit_params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                       "pruned": sum(p.numel() for p in dense.parameters())},
        "kept": kept, "mask_scores_moved": moved, "alpha": cfg.alpha,
        "history_tail": {"masks": h1[-1] if h1 else None, "dense": h2[-1] if h2 else None},
        "steps": {"masks": cfg.mask_steps, "dense": cfg.finetune_steps}, "world": world,
        "losses": {"masks": h1, "dense": h2}, **sets,
        "pruned": evaluate_model(t_cfg, dense, te, decoder, heldout, cfg),
        "teacher": evaluate_model(t_cfg, teacher, te, decoder, heldout, cfg),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with atomic_folder(out / "result") as tmp:
        (tmp / "prune.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result
