"""The calibration workflow behind ``sd.calibrate``, ``s2dit-deploy calibrate`` and ``--quant w4a8-mixed``.

Steps: (1) float streaming runs of the calibration prompts are recorded (every stage call, caches
included) with per-layer activation statistics; (2) for ``w4a8-mixed`` every DiT layer is
quantized alone under each measured scheme (round-to-nearest int4, GPTQ int4 / int8) and the DiT
step output and the cache states it writes are measured, other schemes estimated (cached,
resumable); (3) the allocator picks legal per-layer schemes under the size budget (default: the
size of ``w4a8-uniform``) for a few candidate settings, and the decoded-stream check keeps the
best (``stream_search.py``); (4) ``plan.json`` (+ its GPTQ weights sidecar) and a report are
written. ``evaluate`` adds the fake-quant PSNR of every preset on evaluation prompts disjoint from
calibration.

Everything lands in one work folder per model hash and resolution (default
``$S2DIT_CACHE/quant/<model>-<hash>-<HxW>``), and a plan is reused when its settings key matches,
so ``calibrate`` then ``compile --quant plan.json`` and ``compile --quant w4a8-mixed`` give the
same plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .capture import CALIB_PROMPTS, CalibrationSet, cache_root, capture, model_hash
from .errors import CalibrationConfigError
from .plan import FIXED_PRESETS, MIXED, PRESETS, QuantPlan, preset_plan
from .schemes import DEFAULT_ESTIMATE, DEFAULT_MEASURE, target_schemes, weight_scheme

log = logging.getLogger(__name__)

# Candidate allocations the stream check chooses among: (scheme set, weight of the cache-state error).
# Estimated low-bit LUTs are the riskiest choices (their noise is scaled from a measured int4 point),
# hence the sets without them.
CANDIDATES = tuple((name, dropped, lam) for name, dropped in (("all", ()), ("no-lut2", ("lut2",)),
                                                              ("no-lut2-3", ("lut2", "lut3")))
                   for lam in (0.0, 1.0))
QNN_TARGETS = ("executorch-qnn", "onnx-qnn")
STREAM_CHUNKS = 4
WORKFLOW_VERSION = 6  # bump when the workflow's logic changes what plan the same settings give


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that decides a plan besides the weights: its hash keys the cached plan."""

    target: str = "coreml"
    preset: str = MIXED
    prompts: int = 4
    chunks: int = 2
    steps: int | None = None
    calls: int = 2
    range_method: str = "mse"
    measure: tuple[str, ...] = DEFAULT_MEASURE
    estimate: tuple[str, ...] = DEFAULT_ESTIMATE
    budget_mb: float | None = None
    avg_bits: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> CalibrationConfigError:
            return CalibrationConfigError(f"calibration setting {field}={getattr(self, field)!r}: {why}")

        try:
            target_schemes(self.target)
        except KeyError as exc:
            raise bad("target", str(exc).strip("'\"")) from None
        if self.preset not in PRESETS:
            raise bad("preset", f"use one of {', '.join(PRESETS)}")
        if not 1 <= self.prompts <= len(CALIB_PROMPTS):
            raise bad("prompts", f"must be 1..{len(CALIB_PROMPTS)}")
        for f in ("chunks", "calls"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise bad(f, "must be a positive integer")
        if self.steps not in (None, 1, 2, 4):
            raise bad("steps", "must be 1, 2 or 4")
        if self.range_method not in ("minmax", "percentile", "mse"):
            raise bad("range_method", "use minmax, percentile or mse")
        for f in ("measure", "estimate"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
            for s in getattr(self, f):
                try:
                    weight_scheme(s)
                except ValueError as exc:
                    raise bad(f, str(exc)) from None
        if not any(weight_scheme(s).rounding == "nearest" for s in self.measure):
            raise bad("measure", "needs one round-to-nearest scheme (e.g. int4-pc) to scale the estimates from")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise bad("budget_mb", "must be > 0")
        if self.avg_bits is not None and not 1 <= self.avg_bits <= 16:
            raise bad("avg_bits", "must be within 1..16")

    def key(self) -> str:
        """Hash of the settings and of the workflow's fixed choices (a change to either re-plans)."""
        from .gptq import CONFIG as gptq

        doc = {**asdict(self), "candidates": CANDIDATES, "stream_chunks": STREAM_CHUNKS, "version": WORKFLOW_VERSION,
               "gptq": gptq}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]


def default_work(pipe) -> Path:
    cfg = pipe.config
    return cache_root() / "quant" / f"{cfg.name}-{model_hash(pipe)}-{cfg.height}x{cfg.width}"


def _calibration(pipe, s: CalibrationSettings, work: Path, progress: bool) -> CalibrationSet:
    folder = work / "calib"
    if (folder / "calib.safetensors").is_file():
        calib = CalibrationSet.load(folder)
        want = (list(CALIB_PROMPTS[:s.prompts]), s.chunks, s.steps or pipe.config.steps, model_hash(pipe))
        have = (calib.meta["prompts"], calib.meta["num_chunks"], calib.meta["steps"], calib.meta["model_hash"])
        if want == have:
            return calib
    return capture(pipe, CALIB_PROMPTS[:s.prompts], num_chunks=s.chunks, steps=s.steps, out_dir=folder,
                   progress=progress)


def _plan_act(plan) -> str:
    """The activation scheme a preset gave the DiT (the sensitivity runs use the same)."""
    acts = {lq.act for lq in plan.stages["dit_step"].values() if lq.act != "float"}
    return sorted(acts)[0] if acts else "float"


def _mixed(pipe, calib, base, layout, s: CalibrationSettings, work: Path, progress: bool, timing: dict):
    """Sensitivity, candidate allocations and the stream check -> (plan, results, runner)."""
    from . import allocate as alloc
    from .sensitivity import SensitivityRunner
    from .stream_search import StreamCheck, choose

    ts = target_schemes(s.target)
    t1 = time.perf_counter()
    measured = tuple(x for x in s.measure if ts.legal_weight(x)) or ("int4-pc",)
    estimated = tuple(x for x in s.estimate if ts.legal_weight(x) and x not in measured)
    act = _plan_act(base)
    runner = SensitivityRunner(pipe, calib, "dit_step", act, s.range_method, s.calls,
                               work / f"sensitivity-dit_step-{act}-{s.range_method}.json")
    results = runner.per_layer(measured, estimated, progress=progress)
    timing["sensitivity_s"] = round(time.perf_counter() - t1, 1)
    shapes, kinds = dict(layout.layers), dict(layout.kinds)
    if s.avg_bits is not None:
        budget = alloc.budget_bytes(shapes, avg_bits=s.avg_bits)
    elif s.budget_mb is not None:
        budget = s.budget_mb * 1e6
    else:
        budget = alloc.budget_bytes(shapes, like={n: lq.weight for n, lq in base.stages["dit_step"].items()})
    # QNN: no per-layer 16-bit activations until a mixed-bit DiT step is shown to prepare on HTP.
    # Measured on s2dit-small: with 16a layers graph prepare failed ("could not create op" on layer
    # norms, GELUs); without them too, and so does QNN's own 8a4w preset (on convolutions), so the
    # 4-bit DiT step itself does not prepare on this SDK's HTP emulator yet.
    wide = {} if s.target in QNN_TARGETS else alloc.wide_activation_layers(results, s.target)
    t2 = time.perf_counter()
    check = StreamCheck(pipe, calib, STREAM_CHUNKS)
    candidates = []
    for set_name, dropped, lam in CANDIDATES:
        schemes = tuple(x for x in ts.weights if x not in dropped) if dropped else None
        prov = {"metric": "dit_step velocity MSE + state_weight x cache-state MSE", "sensitivity_calls": runner.call_ids,
                "commit_calls": runner.commit_ids, "measured": list(measured), "estimated": list(estimated),
                "schemes": set_name}
        plan = alloc.mixed_plan(base, "dit_step", results, shapes, budget, runner.peak, schemes=schemes,
                                provenance=prov, state_weight=lam, rounded=runner.rounded, wide_acts=wide,
                                kinds=kinds)
        if any(c.stages == plan.stages for _, c in candidates):
            continue  # e.g. QNN: no scheme below int4, so every scheme set allocates the same plan
        candidates.append(({"schemes": set_name, "state_weight": lam}, plan))

    def step_db(plan) -> float:  # measured on the sensitivity calls (calibration data)
        return float(runner.measure(dict(plan.stages["dit_step"]))["psnr"])

    plan, table = choose(check, candidates, step_db)
    timing["stream_check_s"] = round(time.perf_counter() - t2, 1)
    return plan.with_provenance(candidates=table), results, runner


def calibrate_pipeline(pipe, settings: CalibrationSettings, work: str | Path | None = None,
                       out: str | Path | None = None, evaluate: bool = False, curve_points: int = 6,
                       progress: bool = True) -> dict[str, Any]:
    """Run (or reuse) the workflow for ``pipe``; returns the result document (``plan_obj``: the plan)."""
    from .report import write_report
    from .size import pipeline_layout, plan_size

    s = settings
    name = pipe.config.name
    work = Path(work) if work is not None else default_work(pipe)
    resolution = f"{pipe.config.height}x{pipe.config.width}"
    cached = work / f"plan-{s.preset}-{s.target}-{s.key()}.json"
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    calib = _calibration(pipe, s, work, progress)
    timing["calibration_s"] = round(time.perf_counter() - t0, 1)
    layouts = pipeline_layout(pipe)
    shapes = layouts["dit_step"].layers
    prov = {**calib.provenance(), "resolution": resolution, "settings": asdict(s), "settings_key": s.key()}
    results = curve = None
    plan = None
    if cached.is_file():
        plan = QuantPlan.load(cached)
        if plan.provenance.get("model_hash") != model_hash(pipe) or plan.provenance.get("settings_key") != s.key():
            plan = None
        else:
            log.info("reusing %s", cached)
    if plan is None:
        base_name = "w4a8-uniform" if s.preset == MIXED else s.preset
        base = preset_plan(base_name, layouts, name, s.target, calib.stats, s.range_method, prov)
        if s.preset == MIXED:
            plan, results, runner = _mixed(pipe, calib, base, layouts["dit_step"], s, work, progress, timing)
            t3 = time.perf_counter()
            from .sensitivity import sensitivity_order

            base_scheme = next(x for x in s.measure if weight_scheme(x).rounding == "nearest")
            curve = runner.cumulative(sensitivity_order(results, base_scheme), base_scheme, curve_points,
                                      decoded=True, progress=progress)
            timing["cumulative_s"] = round(time.perf_counter() - t3, 1)
        else:
            plan = base
        plan = QuantPlan(s.preset, plan.model, plan.stages, plan.target,
                         {**plan.provenance, "preset": s.preset, "model_name": name,
                          "report": f"report-{s.preset}-{s.target}"}, plan.rounded)
        plan.save(cached)
    presets = []
    if evaluate:
        presets = evaluate_presets(pipe, calib, plan, layouts, s, timing)
    size = plan_size(plan, layouts)
    report_dir = work / plan.provenance["report"]
    report = write_report(report_dir, plan, "dit_step", shapes, results, curve, presets,
                          {"timing": timing, "size": size})
    out_path = cached
    if out is not None:  # the plan, its sidecar and its report folder travel together
        import shutil

        out_path = plan.save(out)
        if out_path.parent.resolve() != work.resolve():
            shutil.copytree(report_dir, out_path.parent / report_dir.name, dirs_exist_ok=True)
    plan = QuantPlan.load(out_path)
    return {"plan": str(out_path), "plan_obj": plan, "model": name, "target": s.target, "preset": s.preset,
            "resolution": resolution, "work": str(work), "calibration_hash": calib.hash, "size": size,
            "timing": timing, "counts": plan.counts(), "predicted_psnr_db": plan.provenance.get("predicted_psnr_db"),
            "candidates": plan.provenance.get("candidates", []), "cumulative": curve, "presets": presets,
            "report": report["files"]}


def evaluate_presets(pipe, calib, plan, layouts, s: CalibrationSettings, timing: dict) -> list[dict[str, Any]]:
    """Fake-quant step and 4-chunk stream PSNR of every fixed preset and of ``plan``, on held-out prompts."""
    from .evaluate import Evaluator
    from .size import plan_size

    t = time.perf_counter()
    ev = Evaluator(pipe, calib=calib)
    prov = calib.provenance()
    plans = [preset_plan(p, layouts, pipe.config.name, s.target, calib.stats, s.range_method, prov)
             for p in FIXED_PRESETS]
    if plan.name not in FIXED_PRESETS:
        plans.append(plan)
    rows = []
    for c in plans:
        sz = plan_size(c, layouts)
        rows.append({**ev.evaluate(c), **{k: v for k, v in sz.items() if k != "stages"},
                     "dit_step_bytes": sz["stages"]["dit_step"]["bytes"],
                     "dit_avg_weight_bits": sz["stages"]["dit_step"]["avg_weight_bits"]})
    timing["evaluate_s"] = round(time.perf_counter() - t, 1)
    return rows


def mixed_plan_for(pipe, target: str | None) -> QuantPlan:
    """The ``w4a8-mixed`` plan ``compile`` / ``export`` use for ``pipe`` on ``target``: the newest one
    ``calibrate`` wrote into this model's work folder (same weights, resolution and target, any
    settings), else one computed now with the default settings (and cached there)."""
    target = target or "fake"
    work = default_work(pipe)
    found = []
    for path in work.glob(f"plan-{MIXED}-{target}-*.json"):
        try:
            plan = QuantPlan.load(path)
        except (ValueError, OSError) as exc:
            log.warning("ignoring cached plan %s: %s", path, exc)
            continue
        if plan.provenance.get("model_hash") == model_hash(pipe):
            found.append((path.stat().st_mtime, path.name, plan))
    if found:
        _, name, plan = max(found, key=lambda f: (f[0], f[1]))
        log.info("w4a8-mixed: using the calibrated plan %s", work / name)
        return plan
    log.info("w4a8-mixed: no calibrated plan for %s on %s yet; calibrating with the default settings",
             pipe.config.name, target)
    return calibrate_pipeline(pipe, CalibrationSettings(target=target), progress=False)["plan_obj"]


def calibrate(model: str = "s2dit-small", checkpoint: str | None = None, target: str = "coreml",
              preset: str = MIXED, *, work: str | Path | None = None, out: str | Path | None = None,
              evaluate: bool = False, curve_points: int = 6, threads: int | None = None,
              height: int | None = None, width: int | None = None, progress: bool = True,
              **settings: Any) -> dict[str, Any]:
    """Calibrate quantization for a model and write a QuantPlan (``import s2dit_deploy as sd; sd.calibrate``).

    ``settings`` are the fields of ``CalibrationSettings`` (prompts, chunks, steps, calls,
    range_method, measure, estimate, budget_mb, avg_bits). Returns the result document; its
    ``plan`` is the path of the plan JSON (``out``, or the cached copy in the work folder)."""
    from s2dit_deploy.model_zoo.pipeline import load_pipeline

    unknown = set(settings) - set(CalibrationSettings.__dataclass_fields__)
    if unknown:
        raise CalibrationConfigError(f"unknown calibration setting(s) {sorted(unknown)}; known: "
                                     f"{', '.join(CalibrationSettings.__dataclass_fields__)}")
    s = CalibrationSettings(target=target, preset=preset, **settings)
    if threads:
        torch.set_num_threads(threads)
    pipe = load_pipeline(model, checkpoint, height=height, width=width)
    return calibrate_pipeline(pipe, s, work, out, evaluate, curve_points, progress)
