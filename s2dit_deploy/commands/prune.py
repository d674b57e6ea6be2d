"""`s2dit-deploy prune --teacher DIR`: KD-guided tri-level pruning (Taming-DiT Sec. 4.2).

Blocks, attention heads and FFN channels are masked (Eq. 3-4) from group-wise candidate sets, the
masks learned with the weights on L_flow + alpha * L_distill (Eq. 5-6, alpha = 0.01), and the
result converted to a dense compact checkpoint (``model/``) that every target compiles as it is.
Size the target with --keep-blocks / --keep-heads / --keep-ffn, or --target-params. A rerun resumes.

--plan prices a target on paper (no weights, no training): parameters and the cost model's DiT-step
estimate of the teacher and of the pruned shape. The seed's own recipe (2B base, 28 -> 20 blocks,
32 -> 20 heads, FFN -25 %):

  s2dit-deploy prune --plan --config reference_training/recipes/prune-seed-2b.json --device iphone-16-pro-max
  s2dit-deploy prune --teacher runs/wide/model --target-params 7876672 --out runs/prune

Training runs under torchrun too (DDP; each process takes its slice of the global batch, rank 0
writes and evaluates)::

  torchrun --nproc_per_node 2 -m s2dit_deploy prune --teacher runs/wide/model --target-params 7876672
"""

from __future__ import annotations

import argparse

from . import _checks

NAME = "prune"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="KD-guided tri-level pruning to a dense compact model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="trained supernet checkpoint (or a model card with --plan)")
    p.add_argument("--config", default=None, help="JSON file with any PruneConfig fields")
    p.add_argument("--out", default=None, help="output folder (default runs/prune)")
    p.add_argument("--keep-blocks", type=_checks.int_at_least(0), default=None, help="blocks kept in all (>= 1 per group)")
    p.add_argument("--keep-heads", type=_checks.int_at_least(0), default=None, help="heads kept per attention")
    p.add_argument("--keep-ffn", type=_checks.int_at_least(0), default=None, help="FFN channels kept per block")
    p.add_argument("--target-params", type=_checks.int_at_least(1), default=None,
                   help="instead of the three: the least-pruned shape with at most this many DiT parameters")
    p.add_argument("--mask-steps", type=_checks.int_at_least(0), default=None)
    p.add_argument("--finetune-steps", type=_checks.int_at_least(0), default=None)
    p.add_argument("--batch-size", type=_checks.int_at_least(1), default=None)
    p.add_argument("--seed", type=_checks.seed, default=None)
    p.add_argument("--plan", action="store_true", help="price the target on paper only (no training)")
    p.add_argument("--device", default="iphone-16-pro-max", help="device profile of the --plan latency estimate")
    p.add_argument("--precision", default="w8a8", choices=("fp16", "w8a16", "w8a8", "w4a8", "w4a16", "fp32"),
                   help="precision of the --plan estimate (default w8a8)")
    p.add_argument("--resolution", type=_checks.resolution, default=None,
                   help="HxW of the --plan estimate (default: the card's deploy resolution)")
    p.add_argument("--threads", type=_checks.int_at_least(1), default=None, help="torch CPU threads")
    return p


def plan(cfg, device: str, precision: str, resolution) -> dict:
    """Parameters and estimated DiT-step latency of the teacher and of the pruned shape (meta device)."""
    import dataclasses

    import torch

    from s2dit_deploy.bench.cost_model import estimate_ops
    from s2dit_deploy.bench.stage_ops import stage_ops
    from s2dit_deploy.model_zoo.registry import CARDS, build_stage, resolve
    from s2dit_deploy.model_zoo.stats import count_params
    from s2dit_deploy.reference_training.latent_flow import dit_config_with
    from s2dit_deploy.reference_training.prune.masks import check_shape
    from s2dit_deploy.reference_training.prune.plan import fractions, plan_shape, pruned_config, shape_params
    from s2dit_deploy.targets.devices import get_device

    dev = get_device(device)
    config, _ = resolve(cfg.teacher)
    res = resolution or (CARDS[config.name].deploy_resolution if config.name in CARDS else (config.height, config.width))
    config = dataclasses.replace(config, dit=dit_config_with(config.dit, cfg.teacher_dit)).with_resolution(*res)
    if cfg.target_params:
        shape, _ = plan_shape(config.dit, cfg.target_params, cfg.ffn_group)
    else:
        shape = check_shape(config.dit, cfg.keep_blocks, cfg.keep_heads, cfg.keep_ffn, cfg.ffn_group)
    pruned = dataclasses.replace(config, dit=pruned_config(config.dit, shape))

    def ms(c):
        return estimate_ops(stage_ops(c, "dit_step"), dev, precision, "dit_step").seconds * 1e3

    with torch.device("meta"):
        teacher_params = count_params(build_stage(config, "dit"))
    t_ms, p_ms = ms(config), ms(pruned)
    return {"teacher": cfg.teacher, "teacher_dit_changes": cfg.teacher_dit, "shape": shape.as_dict(),
            "pruned_fractions": fractions(config.dit, shape),
            "blocks": [config.dit.num_blocks, shape.keep_blocks], "heads": [config.dit.num_heads, shape.keep_heads],
            "ffn_dim": [config.dit.ffn_dim, shape.keep_ffn], "group_blocks": list(pruned.dit.group_blocks),
            "dit_params": {"teacher": teacher_params, "pruned": shape_params(config.dit, shape)},
            "dit_step_ms": {"teacher": t_ms, "pruned": p_ms, "speedup": t_ms / p_ms},
            "latency_label": f"cost-model estimate, {dev.id} {precision}, {res[0]}x{res[1]}, not a measurement"}


def run(args: argparse.Namespace) -> tuple[object, str]:
    import torch

    from s2dit_deploy.errors import UsageError
    from s2dit_deploy.reference_training import configs

    cfg = configs.load_config(configs.PruneConfig, args.config, out=args.out, teacher=args.teacher,
                              keep_blocks=args.keep_blocks, keep_heads=args.keep_heads, keep_ffn=args.keep_ffn,
                              target_params=args.target_params, mask_steps=args.mask_steps,
                              finetune_steps=args.finetune_steps, batch_size=args.batch_size, seed=args.seed)
    if args.plan:
        rep = plan(cfg, args.device, args.precision, args.resolution)
        p, t = rep["dit_params"], rep["dit_step_ms"]
        text = (f"{rep['teacher']} {rep['teacher_dit_changes'] or ''}: blocks {rep['blocks'][0]} -> {rep['blocks'][1]}, "
                f"heads {rep['heads'][0]} -> {rep['heads'][1]}, FFN {rep['ffn_dim'][0]} -> {rep['ffn_dim'][1]}\n"
                f"  DiT params {p['teacher'] / 1e6:,.1f}M -> {p['pruned'] / 1e6:,.1f}M\n"
                f"  DiT step {t['teacher']:.1f} ms -> {t['pruned']:.1f} ms ({t['speedup']:.2f}x; {rep['latency_label']})")
        return rep, text
    if cfg.teacher_dit:
        raise UsageError("teacher_dit changes the teacher on paper; it is for --plan only (training needs its weights)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from s2dit_deploy.reference_training.prune.train import train_prune

    result = train_prune(cfg, progress=not args.json)
    if "rank" in result:  # a torchrun rank other than 0 (only those return one): rank 0 reports
        return result, ""
    p = result["dit_params"]
    text = (f"pruned {result['shape']} -> {result['model']}\n  DiT params {p['teacher']:,} -> {p['pruned']:,}\n"
            f"  held-out eval loss {result['teacher']['eval_loss']:.5f} (teacher) -> {result['pruned']['eval_loss']:.5f}")
    return result, text
