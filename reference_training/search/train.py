"""``s2dit-deploy search``: train the routed sandwich by self-distillation, then pick a layout by DP.

1. The routed student inherits the all-self-attention teacher's weights (``inherit``).
2. Routers and modules train on Eq. 10, ||y-hat - T(y)||^2 on the sandwich's output tokens, with
   exactly k LCHA groups per draw (Gumbel top-k + STE, m_1 = m_M = 1) and tau annealed.
3. The DP over the C(M-2, k) layouts picks the layout with the best router score whose predicted
   cost (device latency from the cost model, or FLOPs) is within the budget (``layouts``).
4. Every layout evaluated (all of them when 2^(M-2) is small) gets its held-out Eq. 10 loss with
   fixed routers: the Pareto plot of predicted cost vs loss, and a check of the DP's choice.
5. The fixed layout's active modules become a plain checkpoint (``model/``) that compiles as is.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...model_zoo.checkpoint import atomic_folder
from ...model_zoo.registry import load_stage, resolve
from ..common import (append_jsonl, barrier, check_batch_split, ddp_loss, init_distributed, is_main_process,
                      load_training_state, mean_across_ranks, save_training_state, step_generator)
from ..configs import SearchConfig, write_config
from ..latent_flow import evaluate_model, export_model
from ..latent_set import ensure_sets, latent_batch, noised_batch
from ..losses import self_distillation_loss
from .inherit import check_teacher, fixed_layout_model, routed_student
from .layouts import (RunCosts, check_budget, check_k, dp_layout, k_for_budget, layout_score, layouts_with_k,
                      router_scores)
from .routers import group_scores, layout_routers, sample_fixed_k

log = logging.getLogger(__name__)
EVAL_T = 0.5


def default_budget(costs: RunCosts, k: int | None = None) -> float:
    """Halfway between the cheapest layout and all-LCHA; with k, halfway across that k's layouts."""
    low, high = costs.bounds(k)
    return 0.5 * (low + high)


def resolve_budget(cfg: SearchConfig, costs: RunCosts) -> tuple[int, float]:
    """(k, budget), checked before any work: k in [0, M-2], budget within the layouts' cost range."""
    if cfg.k is not None:
        check_k(costs.groups, cfg.k)
    budget = cfg.budget if cfg.budget is not None else default_budget(costs, cfg.k)
    if cfg.k is not None:
        check_budget(costs, budget, cfg.k)
        return cfg.k, budget
    return k_for_budget(costs, budget), budget


def tau_at(cfg: SearchConfig, step: int) -> float:
    frac = step / max(1, cfg.steps - 1)
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac


@torch.no_grad()
def layout_loss(student, teacher, heldout, layout: str, cfg: SearchConfig) -> float:
    """Held-out Eq. 10 loss of one fixed layout of the routed model (t = 0.5, seeded noise)."""
    total = 0.0
    for b in range(cfg.eval_batches):
        x0, ctx = latent_batch(heldout, b, cfg.batch_size, cfg.seed + 17)
        noise = torch.randn(x0.shape, generator=step_generator(cfg.seed, b, stream=9))
        t = torch.full((x0.shape[0], x0.shape[2]), EVAL_T)
        xt = (1 - EVAL_T) * x0 + EVAL_T * noise
        y_t = teacher.features(xt, t, ctx, cfg.chunk_frames, cfg.window)[0]
        m = layout_routers(layout, x0)
        y_s = student.features(xt, t, ctx, cfg.chunk_frames, cfg.window, routers=m)[0]
        total += float(self_distillation_loss(y_s, y_t))
    return total / cfg.eval_batches


def layouts_to_evaluate(groups: int, k: int, cap: int, score) -> list[str]:
    """All layouts when 2^(M-2) <= cap (the Pareto plot spans every k), else the cap best-scored with k."""
    if 2 ** (groups - 2) <= cap:
        return [lay for kk in range(groups - 1) for lay in layouts_with_k(groups, kk)]
    return sorted(layouts_with_k(groups, k), key=score)[:cap]


def search_objective(student, teacher, cfg: SearchConfig, k: int):
    """Eq. 10 on one batch with one fixed-k router draw: the forward of the DDP loss module."""
    logits = student.sandwich.routers.logits

    def loss(x0, ctx, noise, t, step):
        xt = (1 - t[:, None, :, None, None]) * x0 + t[:, None, :, None, None] * noise
        with torch.no_grad():
            y_t = teacher.features(xt, t, ctx, cfg.chunk_frames, cfg.window)[0]
        m = sample_fixed_k(logits, k, tau_at(cfg, step), step_generator(cfg.seed, step, stream=5)).to(x0.device)
        y_s = student.features(xt, t, ctx, cfg.chunk_frames, cfg.window, routers=m)[0]
        return self_distillation_loss(y_s, y_t), m.detach()

    return loss


def train_search(cfg: SearchConfig, costs: RunCosts, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    check_batch_split(cfg.batch_size, world, "SearchConfig")
    teacher_cfg, teacher_folder = resolve(cfg.teacher)
    check_teacher(teacher_cfg.dit, costs.groups)
    k, budget = resolve_budget(cfg, costs)
    out = Path(cfg.out)
    main = is_main_process()
    if main:
        write_config(out, cfg)
        (out / "costs.json").write_text(json.dumps(costs.to_dict(), indent=1) + "\n")
    teacher = load_stage(teacher_cfg, teacher_folder, "dit").float().eval().requires_grad_(False)
    te = load_stage(teacher_cfg, teacher_folder, "text_encoder").float()
    decoder = load_stage(teacher_cfg, teacher_folder, "decoder").float()
    train, heldout, sets = ensure_sets(out, cfg.teacher, cfg.latents, cfg.heldout, cfg.count, cfg.heldout_count,
                                       cfg.chunks, cfg.seed, progress and main)
    student, inherited = routed_student(teacher)
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("sandwich.") and not name.startswith("sandwich.routers"))
    logits = student.sandwich.routers.logits
    logits.requires_grad_(True)
    modules = [p for n, p in student.named_parameters() if p.requires_grad and n != "sandwich.routers.logits"]
    opt = torch.optim.AdamW([{"params": modules, "lr": cfg.lr}, {"params": [logits], "lr": cfg.router_lr}],
                            betas=(0.9, 0.99), weight_decay=0.0)
    state_dir, start, history = out / "train_state", 0, []
    logits_start = logits.detach().clone()
    if cfg.resume and (state_dir / "state.json").is_file():
        scalars = load_training_state(state_dir, {"student": student}, {"student": opt})
        start, history = scalars["step"], scalars["history"]
        logits_start = torch.tensor(scalars["logits_start"])
        log.info("resumed search at step %d", start)
    teacher.to(device)
    student.to(device)
    objective = ddp_loss(search_objective(student, teacher, cfg, k), device, student=student)
    t0 = time.perf_counter()
    student.train()
    for step in tqdm(range(start, cfg.steps), desc="search", disable=not progress or not main, initial=start,
                     total=cfg.steps):
        loss, m = objective(*noised_batch(cfg, train, step, rank, world, device), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules, 1.0)
        opt.step()
        history.append(mean_across_ranks(loss))
        if main and step % cfg.log_every == 0:
            layout = "".join("L" if v > 0.5 else "S" for v in m.tolist())
            append_jsonl(out / "log.jsonl", {"step": step, "loss": history[-1], "layout": layout,
                                             "scores": group_scores(logits.detach().cpu()).tolist(),
                                             "time": time.perf_counter() - t0})
        if main and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_training_state(state_dir, {"student": student}, {"student": opt},
                                {"step": step + 1, "history": history, "logits_start": logits_start.tolist()})
        barrier()
    train_seconds = round(time.perf_counter() - t0, 1)
    if not main:  # rank 0 evaluates and writes; the others are done
        return {"out": str(out), "rank": rank, "world": world, "steps": cfg.steps, "start": start}
    student.eval().cpu()
    teacher.cpu()
    scores = group_scores(logits.detach()).tolist()
    neg_l, neg_s = router_scores(scores)
    layout, cost, score = dp_layout(costs, k, budget, neg_l, neg_s)
    evaluated = []
    for lay in tqdm(layouts_to_evaluate(costs.groups, k, cfg.max_eval_layouts, lambda x: layout_score(x, neg_l, neg_s)),
                    desc="layouts", disable=not progress):
        evaluated.append({"layout": lay, "k": lay[1:-1].count("L"), "cost": costs.cost(lay),
                          "sd_loss": layout_loss(student, teacher, heldout, lay, cfg),
                          "router_score": layout_score(lay, neg_l, neg_s)})
    feasible = [e for e in evaluated if e["k"] == k and e["cost"] <= budget + 1e-12]
    best_measured = min(feasible, key=lambda e: e["sd_loss"]) if feasible else None
    fixed = fixed_layout_model(student, layout)
    export_model(out / "model", teacher_cfg, fixed, te, decoder)
    result = {
        "out": str(out), "model": str(out / "model"), "layout": layout, "k": k, "budget": budget,
        "cost": cost, "unit": costs.unit, "cost_source": costs.source, "bounds": list(costs.bounds()),
        "router_scores": scores, "router_scores_start": logits_start[1:-1, 0].sub(logits_start[1:-1, 1]).tolist(),
        "dp_score": score, "best_measured_under_budget": best_measured, "evaluated": evaluated,
        "inherited": inherited, "steps": cfg.steps, "start": start, "world": world, "losses": history,
        "final_sd_loss": history[-1] if history else None, **sets,
        "searched": evaluate_model(teacher_cfg, fixed, te, decoder, heldout, cfg),
        "teacher": evaluate_model(teacher_cfg, teacher, te, decoder, heldout, cfg),
        "dit_params": {"teacher": sum(p.numel() for p in teacher.parameters()),
                       "searched": sum(p.numel() for p in fixed.parameters())},
        "train_seconds": train_seconds, "seconds": round(time.perf_counter() - t0, 1),
    }
    result["plot"] = pareto_plot(result, out / "pareto.png")
    with atomic_folder(out / "result") as tmp:
        (tmp / "search.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (cost, loss), sorted by cost."""
    front, best = [], math.inf
    for c, v in sorted(points):
        if v < best:
            front.append((c, v))
            best = v
    return front


def pareto_plot(result: dict, path: Path) -> str | None:
    """Predicted cost vs held-out self-distillation loss of every evaluated layout (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the [report] extra; the numbers are in search.json either way
        log.warning("matplotlib is not installed (pip install 's2dit-deploy[report]'); no Pareto plot")
        return None
    ev = result["evaluated"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sc = ax.scatter([e["cost"] for e in ev], [e["sd_loss"] for e in ev], c=[e["k"] for e in ev], cmap="viridis", s=36)
    fig.colorbar(sc, ax=ax, label="k (LCHA groups in the middle)")
    front = pareto_front([(e["cost"], e["sd_loss"]) for e in ev])
    ax.plot([c for c, _ in front], [v for _, v in front], "k--", lw=1, label="Pareto front")
    chosen = next((e for e in ev if e["layout"] == result["layout"]), None)
    if chosen:
        ax.scatter([chosen["cost"]], [chosen["sd_loss"]], marker="*", s=220, c="red", label=f"DP pick {result['layout']}")
    ax.axvline(result["budget"], color="gray", lw=1, ls=":", label=f"budget {result['budget']:.3g} {result['unit']}")
    for e in ev:
        ax.annotate(e["layout"], (e["cost"], e["sd_loss"]), fontsize=6, alpha=0.7)
    ax.set_xlabel(f"predicted cost of one DiT step ({result['unit']})")
    ax.set_ylabel("held-out self-distillation loss (Eq. 10)")
    ax.set_title(f"sandwich search (k={result['k']} trained): layouts evaluated\n{result['cost_source']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
