"""`s2dit-deploy calibrate`: capture calibration data, measure per-layer sensitivity, write a plan.

A thin wrapper over ``s2dit_deploy.calibrate`` (``quant/workflow.py``): (1) float streaming runs
of the calibration prompts are recorded with per-layer activation statistics; (2) for
``w4a8-mixed`` every DiT layer is quantized alone (round-to-nearest and GPTQ) and the DiT step
output and the cache states it writes are measured (cached, resumable); (3) the allocator picks
legal per-layer schemes under the size budget (default: the size of ``w4a8-uniform``) and a
decoded-stream check picks among candidate allocations; (4) ``plan.json`` (with a GPTQ weights
sidecar) and a report are written. The work folder is shared with ``compile --quant w4a8-mixed``.
``--evaluate`` adds the fake-quant PSNR of every preset on prompts disjoint from calibration.
"""

from __future__ import annotations

import argparse

from . import _checks

NAME = "calibrate"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from s2dit_deploy.quant.plan import PRESETS
    from s2dit_deploy.quant.schemes import DEFAULT_ESTIMATE, DEFAULT_MEASURE

    p = sub.add_parser(NAME, help="calibrate quantization and write a QuantPlan (plan.json)", description=__doc__)
    p.add_argument("--model", default="s2dit-small", help="registered model name (default: s2dit-small)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder instead of the bundled weights")
    p.add_argument("--target", default="coreml", help="target whose legal schemes to use (default coreml; 'fake' = all)")
    p.add_argument("--preset", default="w4a8-mixed", choices=PRESETS, help="preset (default w4a8-mixed)")
    p.add_argument("--resolution", type=_checks.resolution, default=None, help="HxW to calibrate at (default: the checkpoint's)")
    p.add_argument("--prompts", type=_checks.positive_int, default=4, help="number of calibration prompts (default 4)")
    p.add_argument("--chunks", type=_checks.positive_int, default=2, help="chunks per calibration prompt (default 2)")
    p.add_argument("--steps", type=int, default=None, choices=(1, 2, 4), help="denoising steps per chunk")
    p.add_argument("--calls", type=_checks.positive_int, default=2, help="DiT calls scored per sensitivity measurement (default 2)")
    p.add_argument("--range", dest="range_method", default="mse", choices=("minmax", "percentile", "mse"),
                   help="activation range method (default mse)")
    p.add_argument("--measure", default=",".join(DEFAULT_MEASURE), help="weight schemes measured per layer (comma list)")
    p.add_argument("--estimate", default=",".join(DEFAULT_ESTIMATE),
                   help="weight schemes estimated from the measured one (comma list; illegal ones are dropped)")
    p.add_argument("--budget-mb", type=float, default=None, help="DiT weight budget in MB (default: w4a8-uniform size)")
    p.add_argument("--avg-bits", type=float, default=None, help="DiT budget as average weight bits instead")
    p.add_argument("--curve-points", type=_checks.positive_int, default=6, help="points of the cumulative sensitivity curve")
    p.add_argument("--evaluate", action="store_true", help="also evaluate every preset on disjoint prompts")
    p.add_argument("--work", default=None, help="work folder (default $S2DIT_CACHE/quant/<model>-<hash>-<HxW>)")
    p.add_argument("-o", "--out", default=None, help="also write the plan here (default: only the work folder)")
    p.add_argument("--threads", type=_checks.positive_int, default=None,
                   help="torch intra-op threads (1 is much faster on a shared, loaded CPU)")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.api import calibrate

    h, w = args.resolution if args.resolution else (None, None)
    result = calibrate(args.model, args.checkpoint, args.target, args.preset, work=args.work, out=args.out,
                       evaluate=args.evaluate, curve_points=args.curve_points, threads=args.threads,
                       height=h, width=w, progress=not args.json, prompts=args.prompts, chunks=args.chunks,
                       steps=args.steps, calls=args.calls, range_method=args.range_method,
                       measure=tuple(x for x in args.measure.split(",") if x),
                       estimate=tuple(x for x in args.estimate.split(",") if x),
                       budget_mb=args.budget_mb, avg_bits=args.avg_bits)
    result.pop("plan_obj", None)
    size, timing = result["size"], result["timing"]
    text = (f"wrote {result['plan']}: {args.preset} for {args.target}, {size['gb'] * 1000:.2f} MB, "
            f"{size['avg_weight_bits']} avg weight bits; calibration {timing['calibration_s']} s"
            + (f", sensitivity {timing['sensitivity_s']} s" if "sensitivity_s" in timing else ""))
    for c in result["candidates"]:
        text += f"\n  candidate {c['schemes']:<8} state weight {c['state_weight']}: calibration stream " \
                f"{c['calibration_stream_psnr_db']} dB, predicted step {c['predicted_step_psnr_db']} dB"
    for p in result["presets"]:
        text += f"\n  {p['plan']:<14} {p['bytes'] / 1e6:8.3f} MB  DiT step {p['dit_step_psnr_db']} dB  stream " \
                f"{next(v for k, v in p.items() if k.startswith('stream_'))} dB"
    return result, text
