"""`s2dit-deploy search --teacher DIR`: sandwich architecture search under a device budget.

The routed S2DiT inherits the all-self-attention teacher's weights, trains its routers and modules
on the Eq. 10 self-distillation loss with exactly k LCHA groups, and a DP over the C(M-2, k)
layouts picks the best-scored layout whose predicted DiT-step cost fits the budget. The cost is
the device cost model's estimate (``--device``, milliseconds, at ``--resolution``) or FLOPs
(``--flops``). Outputs in --out: ``model/`` (the fixed layout's checkpoint; compile it as it is),
``result/search.json``, ``pareto.png``, ``costs.json``, ``log.jsonl``; a rerun resumes.

  s2dit-deploy train latent-flow --config reference_training/recipes/dense-teacher.json --out runs/dense-teacher
  s2dit-deploy search --teacher runs/dense-teacher/model --device iphone-16-pro-max --out runs/search

The same command runs under torchrun (DDP; each process takes its slice of the global batch, rank 0
writes and evaluates)::

  torchrun --nproc_per_node 2 -m s2dit_deploy search --teacher runs/dense-teacher/model --out runs/search
"""

from __future__ import annotations

import argparse

from . import _checks

NAME = "search"
PRECISIONS = ("fp16", "w8a16", "w8a8", "w4a8", "w4a16", "fp32")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="sandwich architecture search under a latency / FLOPs budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="checkpoint with an all-F (self-attention) layout")
    p.add_argument("--config", default=None, help="JSON file with any SearchConfig fields")
    p.add_argument("--out", default=None, help="output folder (default runs/search)")
    p.add_argument("--k", type=_checks.int_at_least(0), default=None,
                   help="LCHA groups among the M-2 middle groups (default: the most the budget affords)")
    p.add_argument("--budget", type=float, default=None,
                   help="DiT-step budget in ms (--device) or GFLOP (--flops); default halfway between the "
                        "cheapest layout and all-LCHA (with --k: across that k's layouts)")
    unit = p.add_mutually_exclusive_group()
    unit.add_argument("--device", default=None, help="device profile of the latency estimate (see `bench --list-devices`)")
    unit.add_argument("--flops", action="store_true", help="budget by FLOPs instead of estimated latency")
    p.add_argument("--precision", choices=PRECISIONS, default="w8a8", help="precision of the estimate (default w8a8)")
    p.add_argument("--resolution", type=_checks.resolution, default=None,
                   help="HxW the cost is predicted at (default: the model card's deploy resolution)")
    p.add_argument("--steps", type=_checks.int_at_least(1), default=None)
    p.add_argument("--batch-size", type=_checks.int_at_least(1), default=None)
    p.add_argument("--seed", type=_checks.seed, default=None)
    p.add_argument("--threads", type=_checks.int_at_least(1), default=None, help="torch CPU threads")
    return p


def cost_config(teacher: str, resolution):
    """The teacher's config at the resolution its cost is predicted at."""
    from s2dit_deploy.model_zoo.registry import CARDS, resolve

    config, _ = resolve(teacher)
    if resolution is None and config.name in CARDS:
        resolution = CARDS[config.name].deploy_resolution
    return config.with_resolution(*resolution) if resolution else config


def run_costs(config, device: str | None, precision: str):
    from s2dit_deploy.bench.layout_cost import layout_pricer
    from s2dit_deploy.reference_training.search.layouts import RunCosts

    price, unit, source = layout_pricer(config, device, precision)
    return RunCosts.measure(config.dit.num_groups, price, unit, source)


def run(args: argparse.Namespace) -> tuple[object, str]:
    import torch

    from s2dit_deploy.errors import UsageError
    from s2dit_deploy.reference_training import configs
    from s2dit_deploy.reference_training.search.inherit import check_teacher
    from s2dit_deploy.reference_training.search.train import resolve_budget, train_search
    from s2dit_deploy.targets.devices import get_device

    cfg = configs.load_config(configs.SearchConfig, args.config, out=args.out, teacher=args.teacher, k=args.k,
                              budget=args.budget, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    device = None if args.flops else (args.device or "iphone-16-pro-max")
    if device is not None:
        get_device(device)  # an unknown id names the flag and the known ones
    config = cost_config(cfg.teacher, args.resolution)
    check_teacher(config.dit)
    costs = run_costs(config, device, args.precision)
    try:
        resolve_budget(cfg, costs)  # k and budget checked against the layouts' costs before training
    except ValueError as exc:
        raise UsageError(f"argument --budget/--k: {exc}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_search(cfg, costs, progress=not args.json)
    if "rank" in result:  # a torchrun rank other than 0 (only those return one): rank 0 reports
        return result, ""
    ev = {e["layout"]: e for e in result["evaluated"]}
    lines = [f"searched layout {result['layout']} (k={result['k']}): predicted {result['cost']:.4g} {result['unit']} "
             f"per DiT step, budget {result['budget']:.4g} ({result['cost_source']})",
             f"  held-out Eq. 10 loss {ev[result['layout']]['sd_loss']:.5f}" if result["layout"] in ev else "",
             f"  searched model: {result['model']}  ({result['dit_params']['searched']:,} DiT params)",
             f"  Pareto plot: {result['plot']}" if result["plot"] else "  (no plot: matplotlib missing)"]
    return result, "\n".join(x for x in lines if x)
