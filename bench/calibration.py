"""Fit the cost model's efficiencies per device family on published device latencies.

The calibration set (``calibration/published_latencies.json``) holds on-device latencies of public
models the project rebuilds with random weights (``calibration_models``), each row with its
source. The fit minimizes squared log error (a 2x miss counts the same at 1 ms and at 100 ms)
with a weak prior that pulls every factor toward the model's defaults, so a family with few rows
keeps sane values for the factors its rows cannot identify (e.g. Apple's int8 factor from fp16
rows). Leave-one-model-out cross-validation refits without each architecture and predicts it,
which is the error to expect on a model the fit has never seen, such as S2DiT.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from s2dit_deploy.targets.devices import get_device, load_profiles

from .cost_model import FITTED_FILE, MODEL_VERSION, PARAM_NAMES, CostParams, OpArrays, op_arrays, price
from .op_trace import Op, trace_ops

log = logging.getLogger(__name__)

DATA_FILE = Path(__file__).parent / "calibration" / "published_latencies.json"
PRIOR_WEIGHT = 0.05  # per factor, in log units: weak next to a row's squared log error
# bounds per factor (efficiencies are fractions of peak; overheads in microseconds)
# Efficiencies may pass 1 (up to 2) because Qualcomm's peaks are nominal guesses; a fitted value
# above 1 on a published peak would say the peak is wrong, and the fit report shows it.
BOUNDS = {"eff_matmul": (0.01, 2.0), "eff_conv": (0.01, 2.0), "eff_attention": (0.005, 2.0),
          "eff_vector": (0.001, 2.0), "eff_int8": (0.25, 2.0), "mem_eff": (0.05, 1.0), "act_dram": (0.005, 1.0),
          "op_overhead_us": (0.01, 500.0), "boundary_us": (1.0, 5000.0)}
FIT_UNITS = ("npu", "ane", "all")


def load_rows(path: Path = DATA_FILE) -> list[dict[str, Any]]:
    """Rows of the calibration set, each checked: a known device, a model we rebuild, a source."""
    from .calibration_models import MODELS

    data = json.loads(Path(path).read_text())
    rows, profiles = data["rows"], load_profiles()
    for r in rows:
        where = f"{path.name} row {r.get('id')!r}"
        if r.get("device") not in profiles:
            raise ValueError(f"{where}: unknown device {r.get('device')!r}")
        if r.get("model") not in MODELS:
            raise ValueError(f"{where}: model {r.get('model')!r} is not in calibration_models.MODELS")
        if not (isinstance(r.get("latency_ms"), (int, float)) and r["latency_ms"] > 0):
            raise ValueError(f"{where}: latency_ms must be a positive number")
        src = r.get("source") or {}
        if not (src.get("repo") and src.get("path") and src.get("locator")):
            raise ValueError(f"{where}: every row needs source.repo, source.path and source.locator")
    return rows


@lru_cache(maxsize=None)
def model_ops(key: str) -> tuple[Op, ...]:
    """The traced op list of a calibration model (meta device, seconds)."""
    import torch

    from .calibration_models import get

    m = get(key)
    with torch.device("meta"):
        module, args, kwargs = m.build(), m.inputs(), m.kwargs()
    return tuple(trace_ops(module, args, kwargs))


def _row_arrays(rows: Sequence[dict[str, Any]]) -> list[OpArrays]:
    return [op_arrays(model_ops(r["model"]), get_device(r["device"]), r["precision"]) for r in rows]


def _predict(arrays: Sequence[OpArrays], params: CostParams) -> np.ndarray:
    out = np.empty(len(arrays))
    for i, a in enumerate(arrays):
        _, _, total, bound = price(a, params)
        out[i] = total.sum() + bound
    return out * 1e3


def fit(rows: Sequence[dict[str, Any]], arrays: Sequence[OpArrays] | None = None) -> CostParams:
    """Least-squares fit (log error + weak prior) of one family's factors on ``rows``."""
    from scipy.optimize import least_squares

    arrays = list(arrays) if arrays is not None else _row_arrays(rows)
    y = np.log([r["latency_ms"] for r in rows])
    x0 = np.log(CostParams().vector())
    lo = np.log([BOUNDS[n][0] for n in PARAM_NAMES])
    hi = np.log([BOUNDS[n][1] for n in PARAM_NAMES])

    def resid(x):
        pred = _predict(arrays, CostParams.from_vector(np.exp(x)))
        return np.concatenate([np.log(pred) - y, math.sqrt(PRIOR_WEIGHT) * (x - x0)])

    sol = least_squares(resid, np.clip(x0, lo + 1e-9, hi - 1e-9), bounds=(lo, hi), method="trf",
                        diff_step=1e-3, max_nfev=400)
    return CostParams.from_vector(np.exp(sol.x))


def family_rows(rows: Sequence[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    profiles = load_profiles()
    return [r for r in rows if profiles[r["device"]].family == family and r.get("compute_unit", "npu") in FIT_UNITS]


def cross_validate(rows: Sequence[dict[str, Any]], progress: bool = False) -> list[dict[str, Any]]:
    """Leave one model (architecture) out: refit without its rows, predict them."""
    from tqdm.auto import tqdm

    arrays = _row_arrays(rows)
    out = []
    keys = sorted({r["model"] for r in rows})
    for key in tqdm(keys, desc="leave-one-model-out", unit="fit", disable=not progress):
        train = [i for i, r in enumerate(rows) if r["model"] != key]
        test = [i for i, r in enumerate(rows) if r["model"] == key]
        if not train:
            continue
        p = fit([rows[i] for i in train], [arrays[i] for i in train])
        pred = _predict([arrays[i] for i in test], p)
        for i, ms in zip(test, pred):
            out.append({"id": rows[i]["id"], "model": key, "device": rows[i]["device"],
                        "precision": rows[i]["precision"], "published_ms": rows[i]["latency_ms"],
                        "predicted_ms": float(ms), "error": float(ms / rows[i]["latency_ms"] - 1.0)})
    return out


def _stats(errors: Sequence[float]) -> dict[str, float]:
    a = np.abs(np.asarray(errors))
    return {"median_abs_error": float(np.median(a)), "worst_abs_error": float(a.max()),
            "p90_abs_error": float(np.quantile(a, 0.9))} if len(a) else {}


def calibrate(rows: Sequence[dict[str, Any]] | None = None, cv: bool = True, progress: bool = False) -> dict[str, Any]:
    """Fit every family that has rows; with ``cv`` also its leave-one-model-out errors."""
    rows = list(rows) if rows is not None else load_rows()
    families = sorted({p.family for p in load_profiles().values()})
    result: dict[str, Any] = {"cost_model": MODEL_VERSION, "data": DATA_FILE.name, "families": {}}
    for fam in families:
        fr = family_rows(rows, fam)
        if not fr:
            continue
        params = fit(fr)
        arrays = _row_arrays(fr)
        insample = _predict(arrays, params)
        per_dev: dict[str, int] = defaultdict(int)
        for r in fr:
            per_dev[r["device"]] += 1
        entry: dict[str, Any] = {
            "params": {n: float(v) for n, v in zip(PARAM_NAMES, params.vector())},
            "rows": len(fr), "rows_per_device": dict(sorted(per_dev.items())),
            "models": sorted({r["model"] for r in fr}),
            "in_sample": _stats([p / r["latency_ms"] - 1 for p, r in zip(insample, fr)]),
        }
        if cv:
            loo = cross_validate(fr, progress)
            entry["leave_one_model_out"] = _stats([e["error"] for e in loo])
            signed = np.array([e["error"] for e in loo])
            entry["leave_one_model_out_signed"] = {"p10": float(np.quantile(signed, 0.1)),
                                                   "p90": float(np.quantile(signed, 0.9))}
            entry["leave_one_model_out_rows"] = loo
        result["families"][fam] = entry
        log.info("cost model %s: %s fitted on %d rows", MODEL_VERSION, fam, len(fr))
    return result


def calibration_label(family: str, info: dict[str, Any]) -> str:
    """"estimate (cost model v1, calibrated on N published rows of <family>)"."""
    if not info.get("fitted"):
        return f"estimate (cost model {MODEL_VERSION}, uncalibrated defaults for {family})"
    return f"estimate (cost model {MODEL_VERSION}, calibrated on {info['rows']} published {family} latencies)"


def write_fitted(result: dict[str, Any], path: Path = FITTED_FILE) -> Path:
    """The shipped fit: params, row counts and CV summaries (the per-row CV table stays out)."""
    slim = {"cost_model": result["cost_model"], "data": result["data"], "families": {
        f: {k: v for k, v in e.items() if k != "leave_one_model_out_rows"} for f, e in result["families"].items()}}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(slim, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return Path(path)
