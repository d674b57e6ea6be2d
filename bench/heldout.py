"""Predict the seed's S2DiT device figures (held out of the fit) and report the error of each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .device_report import estimate

HELDOUT_FILE = Path(__file__).parent / "calibration" / "heldout_s2dit.json"
GOAL = 0.25  # issue 11: every held-out figure within +-25%


def heldout_table(model: str | None = None, checkpoint: str | None = None,
                  fit: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per held-out figure: published, predicted at fp16 and at the paper's precision, error.

    ``fit``: a fresh ``calibration.calibrate`` result instead of the shipped fit."""
    data = json.loads(HELDOUT_FILE.read_text())
    model = model or data["model"]
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    rows = []
    for r in data["rows"]:
        out = {"id": r["id"], "device": r["device"], "stage": r["stage"], "unit": r["unit"],
               "published_ms": r["published_ms"], "source": r["source"]}
        for prec in dict.fromkeys(("fp16", "w8a16", r["precision"])):
            key = (r["device"], prec)
            if key not in cache:
                cache[key] = estimate(model, r["device"], prec, checkpoint=checkpoint, fit=fit)
            st = cache[key]["stages"][r["stage"]]
            out[f"predicted_ms_{prec}"] = st["ms"]
            out[f"bound_{prec}"] = st["bound"]
            if prec == r["precision"]:  # where the time goes, to show where a miss comes from
                out["analysis"] = {
                    "gflops": st["gflops"], "compute_ms": st["compute_s"] * 1e3, "memory_ms": st["memory_s"] * 1e3,
                    "vector_layout_share": st["vector_layout_share"], "off_npu_share": st["off_npu_share"],
                    "tflops_estimated": st["gflops"] / st["ms"], "tflops_published_implies": st["gflops"] / r["published_ms"]}
        pred = out[f"predicted_ms_{r['precision']}"]
        out.update({"precision": r["precision"], "predicted_ms": pred, "error": pred / r["published_ms"] - 1.0,
                    "within_goal": abs(pred / r["published_ms"] - 1.0) <= GOAL})
        rows.append(out)
    return rows
