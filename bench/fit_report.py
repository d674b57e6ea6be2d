"""Markdown of a cost-model fit: rows per device, in-sample and leave-one-model-out errors, and
the held-out S2DiT table (predicted vs published, error of each)."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.0f}%"


def fit_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Cost model {result['cost_model']} fit on {result['data']}", ""]
    for fam, e in result["families"].items():
        loo, ins = e.get("leave_one_model_out", {}), e["in_sample"]
        lines += [f"## {fam}: {e['rows']} rows, {len(e['models'])} architectures", "",
                  "| device | rows |", "|---|---|"]
        lines += [f"| {d} | {n} |" for d, n in e["rows_per_device"].items()]
        lines += ["", "| error (|pred/published - 1|) | median | p90 | worst |", "|---|---|---|---|",
                  f"| in sample | {ins['median_abs_error']:.1%} | {ins['p90_abs_error']:.1%} | {ins['worst_abs_error']:.1%} |"]
        if loo:
            lines.append(f"| leave one model out | {loo['median_abs_error']:.1%} | {loo['p90_abs_error']:.1%} | "
                         f"{loo['worst_abs_error']:.1%} |")
        lines += ["", "| factor | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in e["params"].items()]
        lines.append("")
    held = result.get("heldout")
    if held:
        lines += ["## Held-out S2DiT figures (never fitted)", "",
                  "| figure | device | stage | unit | published ms | predicted fp16 | predicted w4a8-mixed | error | bound | within ±25% |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in held:
            lines.append(f"| {r['id']} | {r['device']} | {r['stage']} | {r['unit']} | {r['published_ms']:.0f} | "
                         f"{r['predicted_ms_fp16']:.1f} | {r['predicted_ms']:.1f} | {_pct(r['error'])} | "
                         f"{r['bound_' + r['precision']]} | {'yes' if r['within_goal'] else 'no'} |")
    return "\n".join(lines) + "\n"
