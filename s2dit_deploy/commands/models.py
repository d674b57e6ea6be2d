"""`s2dit-deploy models`: the registered models with parameters, FLOPs and tokens per chunk step."""

from __future__ import annotations

import argparse

NAME = "models"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="list models with params, FLOPs and tokens per chunk step",
                       description=__doc__)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    return p


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy import list_models

    models = list_models(with_flops=not args.no_flops)
    header = f"{'name':<14}{'HxW':>9}{'DiT':>9}{'text':>9}{'decoder':>9}{'tokens':>8}{'FLOPs/step':>12}{'dense attn':>12}  weights"
    rows = [header]
    for m in models:
        p = m["params"]
        flops = _fmt(m["dit_step_flops"]) if "dit_step_flops" in m else "-"
        dense = _fmt(m["dit_step_flops_full_attention"]) if "dit_step_flops_full_attention" in m else "-"
        rows.append(
            f"{m['name']:<14}{m['resolution']:>9}{_fmt(p['dit']):>9}{_fmt(p['text_encoder']):>9}"
            f"{_fmt(p['decoder']):>9}{m['tokens_per_chunk_step']:>8}{flops:>12}{dense:>12}  {m['weights']}"
        )
    return models, "\n".join(rows)
