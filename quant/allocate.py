"""Bit allocation: per-layer schemes that minimize total output noise under a size budget.

Each layer offers (bytes, noise) points, one per legal scheme with a sensitivity result; noises of
different layers are treated as additive (output MSE). The allocator walks each layer's lower
convex hull and repeatedly buys the upgrade with the most noise removed per byte that still fits
the budget (the classic marginal-analysis solution of the multiple-choice knapsack; optimal on the
hull points). Only target-legal schemes are ever considered.

A layer's noise is its velocity MSE plus ``state_weight`` times its cache-state error
(``sensitivity.py``: what the commit pass writes for later chunks), so layers that feed the
KV / LCHA states pay for the error they carry forward. ``state_weight`` is chosen by the
decoded-stream check in ``stream_search.py``.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping
from typing import Any

from .plan import QuantPlan
from .schemes import act_scheme, target_schemes, weight_scheme

log = logging.getLogger(__name__)


class BudgetError(ValueError):
    """No assignment of legal schemes fits the budget."""


def _hull(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Lower-left convex hull of (bytes, noise, scheme), bytes ascending, noise descending."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    frontier: list[tuple[float, float, str]] = []
    for p in pts:  # Pareto: strictly less noise for more bytes
        if not frontier or p[1] < frontier[-1][1]:
            if frontier and p[0] == frontier[-1][0]:
                frontier[-1] = p
            else:
                frontier.append(p)
    hull: list[tuple[float, float, str]] = []
    for p in frontier:  # convexity: slopes (noise drop per byte) must decrease
        while len(hull) >= 2:
            (b1, n1, _), (b2, n2, _) = hull[-2], hull[-1]
            if (n1 - n2) * (p[0] - b2) <= (n2 - p[1]) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(costs: Mapping[str, Mapping[str, tuple[float, float]]], budget_bytes: float) -> dict[str, str]:
    """{layer: {scheme: (bytes, noise)}} -> {layer: scheme} with sum bytes <= budget."""
    hulls = {n: _hull([(b, e, s) for s, (b, e) in opts.items()]) for n, opts in costs.items()}
    empty = [n for n, h in hulls.items() if not h]
    if empty:
        raise BudgetError(f"no candidate scheme for layers {empty[:5]}")
    pos = {n: 0 for n in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bytes * (1 + 1e-9):
        raise BudgetError(f"even the cheapest legal schemes need {used / 1e6:.3f} MB > budget {budget_bytes / 1e6:.3f} MB")
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            db, dn = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
            heapq.heappush(heap, (-(dn / max(db, 1e-9)), n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        db = h[i + 1][0] - h[i][0]
        if used + db > budget_bytes * (1 + 1e-9):
            continue  # this layer's next step does not fit; cheaper steps of others still may
        used += db
        pos[n] = i + 1
        push(n)
    return {n: hulls[n][pos[n]][2] for n in hulls}


def _noise(r: Mapping[str, Any], state_weight: float) -> float:
    return float(r["mse"]) + state_weight * float(r.get("state_mse", 0.0))


def layer_costs(results: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]],
                target: str | None, schemes: tuple[str, ...] | None = None,
                state_weight: float = 0.0, kinds: Mapping[str, str] | None = None
                ) -> dict[str, dict[str, tuple[float, float]]]:
    """Legal (bytes, noise) options per layer from sensitivity results (layers without results: int8;
    layers of a kind the target's translation does not quantize: fp16 only)."""
    ts = target_schemes(target)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, shape in shapes.items():
        res = results.get(name, {})
        kind = (kinds or {}).get(name)
        if ts.quantized_kinds is not None and kind is not None and kind not in ts.quantized_kinds:
            out[name] = {"fp16": (weight_scheme("fp16").nbytes(shape), _noise(res["act_only"], state_weight)
                                  if "act_only" in res else 0.0)}
            continue
        opts = {}
        for s, r in res.items():
            if s in ("act_only", "local") or not isinstance(r, dict) or not ts.legal_weight(s):
                continue
            if schemes is not None and s not in schemes:
                continue
            opts[s] = (weight_scheme(s).nbytes(shape), _noise(r, state_weight))
        if "act_only" in res and ts.legal_weight("fp16") and (schemes is None or "fp16" in schemes):
            opts["fp16"] = (weight_scheme("fp16").nbytes(shape), _noise(res["act_only"], state_weight))
        if not opts:  # no evidence: keep the layer at a safe 8-bit
            fallback = "int8-pc" if ts.legal_weight("int8-pc") else ts.weights[0]
            opts[fallback] = (weight_scheme(fallback).nbytes(shape), 0.0)
        out[name] = opts
    return out


def predicted_psnr(costs: Mapping[str, Mapping[str, tuple[float, float]]], choice: Mapping[str, str],
                   peak: float) -> float:
    noise = sum(costs[n][s][1] for n, s in choice.items())
    return math.inf if noise <= 0 else 10 * math.log10(peak * peak / noise)


def budget_bytes(shapes: Mapping[str, tuple[int, ...]], avg_bits: float | None = None,
                 like: Mapping[str, str] | None = None) -> float:
    """A stage budget from an average weight bit width, or the size of an existing assignment."""
    if like is not None:
        return sum(weight_scheme(like[n]).nbytes(s) for n, s in shapes.items())
    if avg_bits is None:
        raise ValueError("give avg_bits or like=")
    return sum(math.prod(s) for s in shapes.values()) * avg_bits / 8


WIDE_ACT_SHARE = 0.1  # a layer whose input quantization alone makes >= 10% of the stage's activation noise
WIDE_ACT_MAX = 4  # ... gets 16-bit activations, at most this many layers (by that share)


def wide_activation_layers(results: Mapping[str, Mapping[str, Any]], target: str | None,
                           always: tuple[str, ...] = (), share: float = WIDE_ACT_SHARE,
                           max_layers: int = WIDE_ACT_MAX) -> dict[str, str]:
    """{layer: 16-bit activation scheme} for the layers whose 8-bit input hurts most (measured
    ``act_only`` noise), plus ``always``: int16 where the target runs it (QNN's 16a8w / 16a4w per
    layer), fp16 where it has no int16 (Core ML)."""
    ts = target_schemes(target)
    wide = "int16" if ts.legal_act("int16") else "float" if ts.legal_act("float") else None
    if wide is None:
        return {}
    act = {n: float(r["act_only"]["mse"]) for n, r in results.items() if "act_only" in r}
    total = sum(act.values())
    flagged = [n for n in sorted(act, key=act.get, reverse=True) if total > 0 and act[n] >= share * total]
    return {n: wide for n in (*flagged[:max_layers], *always) if n in results}


def _without_act_noise(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A layer's sensitivity entry with its measured activation-only noise taken out of every option
    (the layer's input is then quantized at 16 bits, whose noise is ~256x smaller)."""
    a = entry.get("act_only", {})
    out: dict[str, Any] = {}
    for s, r in entry.items():
        if not isinstance(r, dict) or "mse" not in r:
            out[s] = r
            continue
        r2 = dict(r)
        for k in ("mse", "state_mse"):
            if k in r:
                r2[k] = max(float(r[k]) - float(a.get(k, 0.0)), 0.01 * float(r[k]))
        out[s] = r2
    return out


def mixed_plan(base, stage: str, results: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]],
               budget: float, peak: float, schemes: tuple[str, ...] | None = None, name: str = "w4a8-mixed",
               provenance: Mapping[str, Any] | None = None, state_weight: float = 0.0,
               rounded: Mapping[str, Mapping[str, Any]] | None = None, wide_acts: Mapping[str, str] | None = None,
               kinds: Mapping[str, str] | None = None):
    """``base`` plan with ``stage``'s weight schemes re-chosen by ``allocate`` under ``budget`` bytes;
    ``rounded`` ({scheme: {layer: tensor}}) supplies the weights of the ``-gptq`` layers chosen and
    ``wide_acts`` ({layer: "int16" | "float"}) the layers whose activations stay at 16 bits."""
    from dataclasses import replace

    wide_acts = {n: w for n, w in (wide_acts or {}).items()
                 if n in base.stages[stage] and not act_scheme(base.stages[stage][n].act).dynamic}
    results = {n: (_without_act_noise(r) if n in wide_acts else r) for n, r in results.items()}
    costs = layer_costs(results, shapes, base.target, schemes, state_weight, kinds)
    choice = allocate(costs, budget)
    layers = dict(base.stages[stage])
    for n, s in choice.items():
        layers[n] = replace(layers[n], weight=s)
        a = act_scheme(layers[n].act)
        if n in wide_acts and not a.is_float and not a.dynamic:  # per-token dynamic int8 is left as it is
            wide = wide_acts[n]
            layers[n] = replace(layers[n], act=wide, act_range=None if wide == "float" else layers[n].act_range)
    stages = {**base.stages, stage: layers}
    kept = {n: (rounded or {})[s][n] for n, s in choice.items() if weight_scheme(s).rounding == "gptq"}
    used = sum(costs[n][s][0] for n, s in choice.items())
    velocity = {n: {s: (b, float(results[n][s]["mse"]) if s in results.get(n, {}) else
                        float(results.get(n, {}).get("act_only", {}).get("mse", 0.0)))
                    for s, (b, _) in opts.items()} for n, opts in costs.items()}
    prov = {**base.provenance, **(provenance or {}), "method": "sensitivity-allocation", "stage": stage,
            "budget_bytes": int(budget), "used_bytes": int(used), "state_weight": state_weight,
            "wide_activations": dict(sorted(wide_acts.items())),
            "predicted_psnr_db": round(predicted_psnr(velocity, choice, peak), 3)}
    plan = QuantPlan(name, base.model, stages, base.target, prov, {**base.rounded, stage: kept} if kept else base.rounded)
    plan.check_target(base.target)
    return plan
