"""Device latency of an op list: a roofline per op with fitted efficiencies (cost model v1).

For each op on its unit (NPU / GPU / CPU) the time is

    max(flops / (peak[unit, compute precision] * eff[kind] * eff_int8?),
        (weight_elems * weight_bits + act_dram * act_elems * act_bits) / 8 / (bandwidth * mem_eff))
    + op_overhead

and every change of unit between consecutive ops adds ``boundary`` (a partition hop: sync, copy,
layout conversion). Weights are read at their stored (compressed) width, so quantization lowers
memory time; int8 activations select the int8 peak (A17+ ANE, HTP), which is where w*a8 gains
compute time. The efficiencies are fitted per device family on published device latencies
(``calibration``); nothing here is fitted to the S2DiT figures, which are held out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from s2dit_deploy.targets.devices import DeviceProfile

from .op_trace import KINDS, Op

MODEL_VERSION = "v1"
FITTED_FILE = Path(__file__).parent / "calibration" / "fitted_params.json"
PARAM_NAMES = ("eff_matmul", "eff_conv", "eff_attention", "eff_vector", "eff_int8", "mem_eff", "act_dram",
               "op_overhead_us", "boundary_us")
# Units the fit never sees (the calibration set is NPU rows): fixed, documented guesses that the
# report flags whenever an estimate leans on them.
UNFITTED_UNIT_EFF = {"gpu": 0.35, "cpu": 0.25}
UNFITTED_UNIT_OVERHEAD_US = {"gpu": 15.0, "cpu": 5.0}
# (weight bits, activation bits) of the plain precisions calibration rows are recorded at
PLAIN = {"fp16": (16, 16), "float": (16, 16), "fp32": (32, 32), "w8a16": (8, 16), "w8a8": (8, 8),
         "w6a16": (6, 16), "w4a16": (4, 16), "w4a8": (4, 8), "int8": (8, 8)}


@dataclass(frozen=True)
class CostParams:
    """The fitted factors of one device family (efficiencies are fractions of peak)."""

    eff_matmul: float = 0.5
    eff_conv: float = 0.4
    eff_attention: float = 0.3
    eff_vector: float = 0.05
    eff_int8: float = 1.0  # int8 efficiency relative to fp16 efficiency
    mem_eff: float = 0.6
    act_dram: float = 0.3  # share of activation bytes that reach DRAM (the rest stays in VTCM / ANE SRAM)
    op_overhead_us: float = 20.0
    boundary_us: float = 300.0

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in PARAM_NAMES], dtype=np.float64)

    @classmethod
    def from_vector(cls, v: Sequence[float]) -> "CostParams":
        return cls(**{n: float(x) for n, x in zip(PARAM_NAMES, v)})

    def eff(self, kind: str) -> float:
        return getattr(self, f"eff_{kind}") if kind != "layout" else 1.0


@lru_cache(maxsize=1)
def _fitted() -> dict[str, Any]:
    return json.loads(FITTED_FILE.read_text()) if FITTED_FILE.exists() else {}


def family_params(family: str, fit: dict[str, Any] | None = None) -> tuple[CostParams, dict[str, Any]]:
    """A family's factors and their provenance (rows, LOO error): from ``fit`` (a fresh
    ``calibration.calibrate`` result) or else the shipped fit; defaults if the family is unfitted."""
    fam = (fit if fit is not None else _fitted()).get("families", {}).get(family)
    if not fam:
        return CostParams(), {"fitted": False}
    return CostParams(**fam["params"]), {k: v for k, v in fam.items() if k != "params"} | {"fitted": True}


def op_bits(op: Op, precision: str, stage: str = "") -> tuple[int, int]:
    """(weight bits, activation bits) of ``op`` at ``precision`` (a plain precision or a quant preset).

    Bits fixed by the artifact (``op.weight_bits`` / ``op.act_bits``) win."""
    if precision in PLAIN:
        w, a = PLAIN[precision]
    else:
        from s2dit_deploy.quant.plan import preset_schemes
        from s2dit_deploy.quant.schemes import act_scheme, weight_scheme

        layer = op.group.split(".", 1)[1] if stage and "." in op.group else op.group
        # w4a8-mixed is allocated per layer from calibration, which a model name has not had; its
        # per-layer bits are estimated with the seed recipe (same activations, ~the same average bits)
        preset = "w4a8-seed" if precision == "w4a8-mixed" else precision
        ws, as_ = preset_schemes(preset, stage or "dit_step", layer)
        w = weight_scheme(ws).bits if op.kind in ("matmul", "conv") else 16
        a = act_scheme(as_).bits or 16
    if op.unit != "npu":
        a = max(a, 16)  # GPU / CPU fallbacks compute in float
    return (op.weight_bits or w, op.act_bits or a)


@dataclass(frozen=True)
class OpArrays:
    """An op list as arrays, priced many times during a fit without rebuilding."""

    flops: np.ndarray
    wbytes: np.ndarray
    abytes: np.ndarray
    kind: np.ndarray  # index into KINDS
    int8: np.ndarray  # bool: int8 compute
    peak: np.ndarray  # ops/s of the op's unit at its compute precision
    unit_npu: np.ndarray  # bool
    unit_eff: np.ndarray  # fixed efficiency for non-NPU units (nan on the NPU)
    overhead_fixed: np.ndarray  # fixed overhead (s) for non-NPU units (nan on the NPU)
    boundaries: int
    bandwidth: float


def op_arrays(ops: Sequence[Op], device: DeviceProfile, precision: str, stage: str = "") -> OpArrays:
    n = len(ops)
    flops, wb, ab, kind, int8, peak = (np.zeros(n) for _ in range(6))
    npu, ueff, ufix = np.ones(n, bool), np.full(n, np.nan), np.full(n, np.nan)
    units = dict(device.units)
    for i, op in enumerate(ops):
        w, a = op_bits(op, precision, stage)
        unit = op.unit if op.unit in units else "npu"
        compute = "int8" if a <= 8 else ("fp32" if a >= 32 and unit != "npu" else "fp16")
        flops[i], kind[i], int8[i] = op.flops, KINDS.index(op.kind), compute == "int8"
        wb[i], ab[i] = op.weight_elems * w / 8.0, op.act_elems * a / 8.0
        peak[i] = units[unit].tops(compute) * 1e12
        if unit != "npu":
            npu[i], ueff[i], ufix[i] = False, UNFITTED_UNIT_EFF[unit], UNFITTED_UNIT_OVERHEAD_US[unit] * 1e-6
    boundaries = sum(1 for x, y in zip(ops, ops[1:]) if x.unit != y.unit)
    return OpArrays(flops, wb, ab, kind.astype(int), int8.astype(bool), peak, npu, ueff, ufix, boundaries,
                    device.bandwidth_gbs * 1e9)


def price(arr: OpArrays, params: CostParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-op (compute s, memory s, total s) and the boundary seconds."""
    kind_eff = np.array([params.eff(k) for k in KINDS])[arr.kind]
    eff = np.where(arr.unit_npu, kind_eff * np.where(arr.int8, params.eff_int8, 1.0), arr.unit_eff)
    eff = np.minimum(eff, 2.0)  # > 1 only where a nominal (unpublished) peak is too low
    t_c = arr.flops / (arr.peak * eff)
    act = np.where(arr.unit_npu, min(params.act_dram, 1.0), 1.0)  # GPU / CPU fallbacks go through DRAM
    t_m = (arr.wbytes + act * arr.abytes) / (arr.bandwidth * min(params.mem_eff, 1.0))
    over = np.where(arr.unit_npu, params.op_overhead_us * 1e-6, arr.overhead_fixed)
    total = np.maximum(t_c, t_m) + over
    return t_c, t_m, total, arr.boundaries * params.boundary_us * 1e-6


@dataclass(frozen=True)
class StageEstimate:
    seconds: float
    compute_bound_share: float  # share of op time in ops whose compute time exceeds memory time
    off_npu_share: float
    boundaries: int
    compute_s: float  # sums over ops of the two roofline terms: where a miss comes from
    memory_s: float
    vector_layout_share: float  # share of op time in vector / layout ops (norms, activations, copies)
    top_ops: tuple[dict[str, Any], ...]
    groups: tuple[tuple[str, float], ...]  # block group -> seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ms"] = self.seconds * 1e3
        d["bound"] = "compute" if self.compute_bound_share >= 0.5 else "memory"
        d["groups"] = [{"group": g, "ms": s * 1e3} for g, s in self.groups]
        return d


def group_of(path: str, depth: int = 3) -> str:
    parts = [p for p in path.split(".") if p]
    return ".".join(parts[:depth]) if parts else "(top)"


def estimate_ops(ops: Sequence[Op], device: DeviceProfile, precision: str, stage: str = "",
                 params: CostParams | None = None, top: int = 10) -> StageEstimate:
    """Estimated device seconds of one call of an op list, with where the time goes."""
    params = params or family_params(device.family)[0]
    arr = op_arrays(ops, device, precision, stage)
    t_c, t_m, total, bound_s = price(arr, params)
    secs = float(total.sum() + bound_s)
    op_s = float(total.sum()) or 1.0
    order = np.argsort(-total)[:top]
    tops = tuple({"op": ops[i].name, "kind": ops[i].kind, "unit": ops[i].unit, "group": ops[i].group,
                  "ms": float(total[i] * 1e3), "bound": "compute" if t_c[i] >= t_m[i] else "memory",
                  "gflops": ops[i].flops / 1e9, "mbytes": float((arr.wbytes[i] + arr.abytes[i]) / 1e6)} for i in order)
    groups: dict[str, float] = {}
    for op, t in zip(ops, total):
        g = group_of(op.group)
        groups[g] = groups.get(g, 0.0) + float(t)
    vl = np.isin(arr.kind, [KINDS.index("vector"), KINDS.index("layout")])
    return StageEstimate(secs, float(total[t_c >= t_m].sum() / op_s), float(total[~arr.unit_npu].sum() / op_s),
                         arr.boundaries, float(t_c.sum()), float(t_m.sum()), float(total[vl].sum() / op_s), tops, tuple(sorted(groups.items(), key=lambda kv: -kv[1])))
