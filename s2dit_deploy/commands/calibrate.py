"""`s2dit-deploy calibrate`: capture calibration data, measure per-layer sensitivity, write a plan.

Steps: (1) float streaming runs of the calibration prompts are recorded (every stage call, caches
included) with per-layer activation statistics, into ``<work>/calib``; (2) for ``w4a8-mixed`` every
DiT layer is quantized alone and the DiT step output measured (cached, resumable); (3) the
allocator picks legal per-layer schemes under the size budget (default: the size of
``w4a8-uniform``); (4) ``plan.json`` and a report (table + plots) are written. ``--evaluate``
adds the fake-quant PSNR of every preset on evaluation prompts disjoint from calibration.
"""

from __future__ import annotations

import argparse
import time

from . import _checks

NAME = "calibrate"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from s2dit_deploy.quant.plan import PRESETS

    p = sub.add_parser(NAME, help="calibrate quantization and write a QuantPlan (plan.json)", description=__doc__)
    p.add_argument("--model", default="s2dit-small", help="registered model name (default: s2dit-small)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder instead of the bundled weights")
    p.add_argument("--target", default="coreml", help="target whose legal schemes to use (default coreml; 'fake' = all)")
    p.add_argument("--preset", default="w4a8-mixed", choices=PRESETS, help="preset (default w4a8-mixed)")
    p.add_argument("--prompts", type=_checks.positive_int, default=4, help="number of calibration prompts (default 4)")
    p.add_argument("--chunks", type=_checks.positive_int, default=2, help="chunks per calibration prompt (default 2)")
    p.add_argument("--steps", type=int, default=None, choices=(1, 2, 4), help="denoising steps per chunk")
    p.add_argument("--calls", type=_checks.positive_int, default=2, help="DiT calls scored per sensitivity measurement (default 2)")
    p.add_argument("--range", dest="range_method", default="mse", choices=("minmax", "percentile", "mse"),
                   help="activation range method (default mse)")
    p.add_argument("--measure", default="int4-pc", help="weight schemes measured per layer (comma list)")
    p.add_argument("--estimate", default="int8-pc,int4-pc-mse,int4-b32,lut6,lut4,lut3,lut2",
                   help="weight schemes estimated from the measured one (comma list; illegal ones are dropped)")
    p.add_argument("--budget-mb", type=float, default=None, help="DiT weight budget in MB (default: w4a8-uniform size)")
    p.add_argument("--avg-bits", type=float, default=None, help="DiT budget as average weight bits instead")
    p.add_argument("--curve-points", type=_checks.positive_int, default=6, help="points of the cumulative sensitivity curve")
    p.add_argument("--evaluate", action="store_true", help="also evaluate every preset on disjoint prompts")
    p.add_argument("--work", default=None, help="work folder (default build/quant/<model>)")
    p.add_argument("-o", "--out", default=None, help="plan path (default <work>/plan-<preset>-<target>.json)")
    p.add_argument("--threads", type=_checks.positive_int, default=None,
                   help="torch intra-op threads (1 is much faster on a shared, loaded CPU)")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    from pathlib import Path

    import torch

    from s2dit_deploy import load_pipeline
    from s2dit_deploy.quant import allocate as alloc
    from s2dit_deploy.quant.capture import (
        CALIB_PROMPTS,
        CalibrationSet,
        capture,
        model_hash,
    )
    from s2dit_deploy.quant.plan import PRESETS, preset_plan
    from s2dit_deploy.quant.report import write_report
    from s2dit_deploy.quant.schemes import target_schemes
    from s2dit_deploy.quant.sensitivity import SensitivityRunner, sensitivity_order
    from s2dit_deploy.quant.size import pipeline_layout, plan_size

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.prompts <= len(CALIB_PROMPTS):
        from s2dit_deploy.errors import UsageError

        raise UsageError(f"--prompts must be 1..{len(CALIB_PROMPTS)}")
    ts = target_schemes(args.target)
    pipe = load_pipeline(args.model, args.checkpoint)
    name = pipe.config.name
    work = Path(args.work or Path("build") / "quant" / name)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    calib_dir = work / "calib"
    calib = None
    if (calib_dir / "calib.safetensors").is_file():
        calib = CalibrationSet.load(calib_dir)
        want = (list(CALIB_PROMPTS[:args.prompts]), args.chunks, args.steps or pipe.config.steps, model_hash(pipe))
        have = (calib.meta["prompts"], calib.meta["num_chunks"], calib.meta["steps"], calib.meta["model_hash"])
        calib = calib if want == have else None
    if calib is None:
        calib = capture(pipe, CALIB_PROMPTS[:args.prompts], num_chunks=args.chunks, steps=args.steps,
                        out_dir=calib_dir, progress=not args.json)
    timing["calibration_s"] = round(time.perf_counter() - t0, 1)

    layouts = pipeline_layout(pipe)
    prov = calib.provenance()
    base_name = "w4a8-uniform" if args.preset == "w4a8-mixed" else args.preset
    plan = preset_plan(base_name, layouts, name, args.target, calib.stats, args.range_method, prov)
    results, curve, runner = None, None, None
    shapes = layouts["dit_step"].layers
    if args.preset == "w4a8-mixed":
        t1 = time.perf_counter()
        measured = tuple(s for s in args.measure.split(",") if s and ts.legal_weight(s)) or ("int4-pc",)
        estimated = tuple(s for s in args.estimate.split(",") if s and ts.legal_weight(s) and s not in measured)
        runner = SensitivityRunner(pipe, calib, "dit_step", plan_act(plan), args.range_method, args.calls,
                                   work / f"sensitivity-dit_step-{plan_act(plan)}-{args.range_method}.json")
        results = runner.per_layer(measured, estimated, progress=not args.json)
        timing["sensitivity_s"] = round(time.perf_counter() - t1, 1)
        if args.avg_bits is not None:
            budget = alloc.budget_bytes(shapes, avg_bits=args.avg_bits)
        elif args.budget_mb is not None:
            budget = args.budget_mb * 1e6
        else:
            budget = alloc.budget_bytes(shapes, like={n: lq.weight for n, lq in plan.stages["dit_step"].items()})
        plan = alloc.mixed_plan(plan, "dit_step", results, shapes, budget, runner.peak,
                                provenance={"metric": "dit_step velocity MSE / PSNR", "sensitivity_calls": runner.call_ids,
                                            "measured": list(measured), "estimated": list(estimated)})
        t2 = time.perf_counter()
        curve = runner.cumulative(sensitivity_order(results, measured[0]), measured[0], args.curve_points,
                                  decoded=True, progress=not args.json)
        timing["cumulative_s"] = round(time.perf_counter() - t2, 1)
    report_dir = work / f"report-{args.preset}-{args.target}"
    plan = type(plan)(plan.name, plan.model, plan.stages, plan.target,
                      {**plan.provenance, "model_name": name, "report_dir": str(report_dir.resolve())})
    out = Path(args.out or work / f"plan-{args.preset}-{args.target}.json")
    plan.save(out)

    presets = []
    if args.evaluate:
        from s2dit_deploy.quant.evaluate import Evaluator

        t3 = time.perf_counter()
        ev = Evaluator(pipe, calib=calib)
        candidates = [preset_plan(p, layouts, name, args.target, calib.stats, args.range_method, prov) for p in PRESETS]
        if args.preset == "w4a8-mixed":
            candidates[PRESETS.index("w4a8-mixed")] = type(plan)("w4a8-seed", plan.model,
                                                                 candidates[PRESETS.index("w4a8-mixed")].stages,
                                                                 plan.target, {})
            candidates.append(plan)
        for c in candidates:
            sz = plan_size(c, layouts)
            presets.append({**ev.evaluate(c), **{k: v for k, v in sz.items() if k != "stages"},
                            "dit_step_bytes": sz["stages"]["dit_step"]["bytes"],
                            "dit_avg_weight_bits": sz["stages"]["dit_step"]["avg_weight_bits"]})
        timing["evaluate_s"] = round(time.perf_counter() - t3, 1)
    size = plan_size(plan, layouts)
    report = write_report(report_dir, plan, "dit_step", shapes, results, curve,
                          presets, {"timing": timing, "size": size})
    result = {"plan": str(out), "model": name, "target": args.target, "preset": args.preset,
              "calibration": str(calib_dir), "calibration_hash": calib.hash, "size": size, "timing": timing,
              "counts": plan.counts(), "predicted_psnr_db": plan.provenance.get("predicted_psnr_db"),
              "cumulative": curve, "presets": presets,
              "report": report["files"]}
    text = (f"wrote {out}: {args.preset} for {args.target}, {size['gb'] * 1000:.2f} MB, "
            f"{size['avg_weight_bits']} avg weight bits; calibration {timing['calibration_s']} s"
            + (f", sensitivity {timing['sensitivity_s']} s" if "sensitivity_s" in timing else ""))
    for p in presets:
        text += f"\n  {p['plan']:<14} {p['bytes'] / 1e6:8.3f} MB  DiT step {p['dit_step_psnr_db']} dB  stream " \
                f"{next(v for k, v in p.items() if k.startswith('stream_'))} dB"
    return result, text


def plan_act(plan) -> str:
    """The activation scheme a preset gave the DiT (the sensitivity runs use the same)."""
    acts = {lq.act for lq in plan.stages["dit_step"].values() if lq.act != "float"}
    return sorted(acts)[0] if acts else "float"
