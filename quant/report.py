"""Quantization report: per-layer table (JSON + markdown) and PNG plots (sensitivity, size vs PSNR).

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly, so no global pyplot state or
backend switch leaks out of library code.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .schemes import weight_scheme

log = logging.getLogger(__name__)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.2f}"
    return str(x)


def layer_table(plan, stage: str, shapes: Mapping[str, tuple[int, ...]],
                results: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per layer: shape, chosen schemes and range, bytes, and the sensitivity evidence."""
    results = results or {}
    order = {}
    if results:
        ranked = sorted(results, key=lambda n: -results[n].get("int4-pc", {}).get("mse", 0.0))
        order = {n: i + 1 for i, n in enumerate(ranked)}
    rows = []
    for name, shape in shapes.items():
        lq = plan.stages.get(stage, {}).get(name) if plan is not None else None
        w = lq.weight if lq else "fp16"
        row: dict[str, Any] = {"layer": name, "shape": list(shape), "params": math.prod(shape), "weight": w,
                               "act": lq.act if lq else "float",
                               "act_range": list(lq.act_range) if lq and lq.act_range else None,
                               "bytes": int(weight_scheme(w).nbytes(shape))}
        res = results.get(name)
        if res:
            row["sensitivity_rank"] = order.get(name)
            row["psnr_db"] = {s: r["psnr"] for s, r in res.items() if isinstance(r, dict) and "psnr" in r}
            row["estimated"] = sorted(s for s, r in res.items() if isinstance(r, dict) and r.get("estimated"))
        rows.append(row)
    return rows


def table_markdown(rows: Sequence[Mapping[str, Any]], schemes: Sequence[str] = ("act_only", "int8-pc", "int4-pc", "lut4")) -> str:
    head = ["layer", "shape", "weight", "act", "range", "KB", "rank", *[f"PSNR {s}" for s in schemes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rng = r.get("act_range")
        p = r.get("psnr_db", {})
        est = set(r.get("estimated", []))
        cells = [r["layer"], "x".join(map(str, r["shape"])), r["weight"], r["act"],
                 f"[{rng[0]:.3g}, {rng[1]:.3g}]" if rng else "-", f"{r['bytes'] / 1024:.1f}",
                 str(r.get("sensitivity_rank", "-")),
                 *[(_fmt(p[s]) + ("*" if s in est else "")) if s in p else "-" for s in schemes]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("PSNR of the stage output with only that layer quantized (weights + its input activations); "
                 "`*` = estimated from the measured int4-pc point by the layer-local error ratio.")
    return "\n".join(lines)


def _canvas(w: float = 10, h: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_sensitivity(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                     schemes: Sequence[str] = ("act_only", "int8-pc", "lut4", "int4-pc", "lut3"),
                     curve: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Per-layer PSNR (model order) for each scheme, and the cumulative curve if given."""
    fig = _canvas(12, 7 if curve else 4.5)
    ax = fig.add_subplot(2 if curve else 1, 1, 1)
    names = list(results)
    for s in schemes:
        ys = [results[n].get(s, {}).get("psnr", math.nan) for n in names]
        ax.plot(range(len(names)), [min(y, 120) for y in ys], ".-", lw=0.8, ms=3, label=s)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("stage-output PSNR, one layer quantized (dB)")
    ax.set_title("per-layer sensitivity (lower = more sensitive)")
    ax.legend(fontsize=8, ncol=len(schemes))
    ax.grid(alpha=0.3)
    if curve:
        ax2 = fig.add_subplot(2, 1, 2)
        ax2.plot([c["layers"] for c in curve], [min(c["psnr"], 120) for c in curve], "o-", label="dit_step")
        if any("decoded_psnr" in c for c in curve):
            ax2.plot([c["layers"] for c in curve], [min(c.get("decoded_psnr", math.nan), 120) for c in curve],
                     "s--", label="decoded chunk")
        ax2.set_xlabel(f"layers quantized to {curve[0]['scheme']} (least sensitive first)")
        ax2.set_ylabel("PSNR (dB)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_size_psnr(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, key: str = "dit_step_psnr_db") -> Path:
    """Model size (MB) vs PSNR, one labeled point per preset / plan."""
    fig = _canvas(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for p in points:
        x, y = p["bytes"] / 1e6, p.get(key, math.nan)
        ax.plot([x], [y], "o")
        ax.annotate(p["plan"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("model size (MB, all stages)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title("size vs fidelity per preset")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_report(out_dir: str | os.PathLike, plan, stage: str, shapes, results=None, curve=None,
                 presets: Sequence[Mapping[str, Any]] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """report.json, report.md and PNG plots in ``out_dir``; returns the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = layer_table(plan, stage, shapes, results)
    doc: dict[str, Any] = {"plan": plan.name if plan else None, "stage": stage,
                           "provenance": dict(plan.provenance) if plan else {}, "counts": plan.counts() if plan else {},
                           "presets": list(presets or []), "cumulative": list(curve or []), "layers": rows,
                           **(extra or {})}
    files = {}
    if results:
        files["sensitivity_png"] = str(plot_sensitivity(results, out / "sensitivity.png", curve=curve))
    if presets:
        files["size_psnr_png"] = str(plot_size_psnr(presets, out / "size_psnr.png"))
    doc["files"] = files
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    md = [f"# Quantization report: {doc['plan']} ({stage})", ""]
    if presets:
        md += ["| plan | MB | avg weight bits | DiT step PSNR | stream PSNR |", "|---|---|---|---|---|"]
        for p in presets:
            sp = next((v for k, v in p.items() if k.startswith("stream_")), "-")
            md.append(f"| {p['plan']} | {p['bytes'] / 1e6:.3f} | {p.get('avg_weight_bits', '-')} | "
                      f"{p.get('dit_step_psnr_db', '-')} | {sp} |")
        md.append("")
    md += [f"provenance: `{json.dumps(doc['provenance'])}`", "", table_markdown(rows)]
    (out / "report.md").write_text("\n".join(md))
    return doc


def bundle_report(out_dir: str | os.PathLike, plan, layouts: Mapping[str, Any],
                  translations: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The quantization part of a compile report, written into the bundle (``quant/``).

    ``plan.json`` (the exact plan compiled), ``report.json`` / ``report.md`` (per-layer table of
    every stage, size, what each target translation did) and, when the plan came from
    ``s2dit-deploy calibrate``, its sensitivity and size-vs-PSNR plots and measurements (found
    next to the plan it was loaded from: ``QuantPlan.report_dir``).
    """
    import shutil

    from .size import plan_size

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    source = plan.report_dir() if hasattr(plan, "report_dir") else None
    measured: dict[str, Any] = {}
    files = {"plan": "quant/plan.json", "report_json": "quant/report.json", "report_md": "quant/report.md"}
    if source is not None and (source / "report.json").is_file():
        measured = json.loads((source / "report.json").read_text())
        for png in ("sensitivity.png", "size_psnr.png"):
            if (source / png).is_file():
                shutil.copyfile(source / png, out / png)
                files[png.replace(".", "_")] = f"quant/{png}"
    elif source is not None:
        log.warning("plan %r names report folder %s, which has no report.json; the bundle report has "
                    "no sensitivity plots", plan.name, source)
    evidence = {r["layer"]: r for r in measured.get("layers", [])}
    tables = {}
    for stage, lay in layouts.items():
        rows = layer_table(plan, stage, lay.layers)
        if stage == "dit_step":  # sensitivity was measured on the DiT step
            rows = [{**evidence.get(r["layer"], {}), **r} for r in rows]
        tables[stage] = rows
    doc = {"plan": plan.name, "provenance": dict(plan.provenance), "counts": plan.counts(),
           "size": plan_size(plan, layouts), "translations": dict(translations or {}),
           "presets": measured.get("presets", []), "cumulative": measured.get("cumulative", []),
           "layers": tables, "files": files}
    (out / "report.json").write_text(json.dumps(doc, indent=1))
    size = doc["size"]
    md = [f"# Quantization: {plan.name}", "",
          f"{size['gb'] * 1000:.2f} MB of weights, {size['avg_weight_bits']} average weight bits", ""]
    for png in ("sensitivity_png", "size_psnr_png"):
        if png in files:
            md += [f"![{png}]({Path(files[png]).name})", ""]
    for stage, rows in tables.items():
        md += [f"## {stage}", "", table_markdown(rows), ""]
    (out / "report.md").write_text("\n".join(md))
    return {"plan": plan.name, "size_mb": round(size["gb"] * 1000, 3),
            "avg_weight_bits": size["avg_weight_bits"], "files": files}
