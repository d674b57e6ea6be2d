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
                  "The error is that of the paper's deployment precision (w4a8-mixed: 8-bit activations, 4/8-bit "
                  "weights); fp16 and w8a16 are shown for comparison.", "",
                  "| figure | device | stage | unit | published ms | fp16 | w8a16 | w4a8-mixed | error | within ±25% |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in held:
            lines.append(f"| {r['id']} | {r['device']} | {r['stage']} | {r['unit']} | {r['published_ms']:.0f} | "
                         f"{r['predicted_ms_fp16']:.1f} | {r['predicted_ms_w8a16']:.1f} | {r['predicted_ms']:.1f} | "
                         f"{_pct(r['error'])} | {'yes' if r['within_goal'] else 'no'} |")
        lines += ["", "### Where the time goes (at the paper's precision)", "",
                  "| figure | GFLOPs | compute ms | memory ms | vector+layout share | off NPU | TFLOPS estimated | TFLOPS the published figure implies |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in held:
            a = r["analysis"]
            lines.append(f"| {r['id']} | {a['gflops']:.0f} | {a['compute_ms']:.1f} | {a['memory_ms']:.1f} | "
                         f"{a['vector_layout_share']:.0%} | {a['off_npu_share']:.0%} | {a['tflops_estimated']:.2f} | "
                         f"{a['tflops_published_implies']:.2f} |")
    return "\n".join(lines) + "\n"
