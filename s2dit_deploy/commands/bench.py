"""`s2dit-deploy bench`: host timings of a bundle, or a device latency estimate (``--device``).

Without ``--device`` it times every stage of a compiled bundle on this machine's host runtime
(median, p10 / p90 / IQR over repeated runs, warm-up excluded, per-operator profiles where the
runtime has them). Each time says what it measures: host CPU, a reference executor or an
emulator; never phone time.

With ``--device D`` it estimates the phone's latency with the calibrated cost model, from a bundle
(op lists read from its artifacts) or from a model name / checkpoint without compiling, in the
layout of the seed's Table A3 (markdown + JSON + PNG with --out). Estimates are labelled so.
``--fit-cost-model`` refits the cost model on the published latencies and predicts the held-out
S2DiT figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _checks

NAME = "bench"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="time a bundle on this host, or estimate device latency (--device)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=None,
                   help="bundle folder written by `compile`; with --device also a model name (e.g. s2dit-mobile)")
    p.add_argument("--device", default=None, help="estimate latency on this phone (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list the device profiles and exit")
    p.add_argument("--precision", default=None,
                   help="with --device: fp16, w8a16, w8a8, w4a16 or a quant preset (w4a8-mixed, ...); "
                        "default: the bundle's quant, or fp16 for a model")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="with --device and a model name: its checkpoint")
    p.add_argument("--steps", type=int, default=None, choices=(1, 2, 4), help="with --device: denoising steps per chunk")
    p.add_argument("--commit-fidelity", action="store_true",
                   help="with --device: also stream the float model both ways (commit clean vs last-step) and "
                        "report the decoded-stream PSNR and boundary jump beside the FPS of each")
    p.add_argument("--fidelity-chunks", type=_checks.positive_int, default=4,
                   help="chunks per prompt of --commit-fidelity (>= 2, default 4)")
    p.add_argument("--fit-cost-model", action="store_true",
                   help="refit the cost model on the calibration set (leave-one-model-out CV) and predict "
                        "the held-out S2DiT figures")
    p.add_argument("--repeats", type=_checks.positive_int, default=20, help="timed runs per stage (default 20)")
    p.add_argument("--warmup", type=_checks.non_negative_int, default=3, help="untimed warm-up runs per stage (default 3)")
    p.add_argument("--stage", action="append", dest="stages", default=None,
                   choices=("text_encoder", "dit_step", "decoder"),
                   help="only this stage (repeatable; default: every stage in the bundle)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-operator profile")
    p.add_argument("--out", default=None, help="also write the report files into this folder")
    p.add_argument("--force", action="store_true", help="replace report files already in --out")
    return p


def _check_out(out: str | None, names: tuple[str, ...], force: bool) -> None:
    """Checked before any work, so no run is lost to an unwritable folder or a file we may not replace."""
    from s2dit_deploy.errors import OutputExistsError, UsageError

    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; name a folder")
    _checks.writable_folder(path, "--out")
    taken = [n for n in names if (path / n).exists()]
    if taken and not force:
        raise OutputExistsError(f"--out {path} already holds {', '.join(taken)}; pass --force to replace them")


def check_precision(value: str | None) -> None:
    from s2dit_deploy.bench.cost_model import PLAIN
    from s2dit_deploy.errors import UsageError
    from s2dit_deploy.quant.plan import PRESETS

    if value is not None and value not in PLAIN and value not in PRESETS:
        raise UsageError(f"--precision {value!r}: use one of {', '.join([*PLAIN, *PRESETS])}")


def _devices() -> tuple[object, str]:
    from s2dit_deploy.targets.devices import list_devices

    devs = [d.as_dict() for d in list_devices()]
    lines = [f"{d['id']:<20} {d['name']} ({d['soc']}), {d['family']}, compile target {d['target']}" for d in devs]
    return {"devices": devs}, "\n".join(lines)


def _fit(args) -> tuple[object, str]:
    from s2dit_deploy.bench.calibration import calibrate, write_fitted
    from s2dit_deploy.bench.fit_report import fit_markdown
    from s2dit_deploy.bench.heldout import heldout_table

    _check_out(args.out, ("cost_model_fit.json", "cost_model_fit.md", "fitted_params.json"), args.force)
    result = calibrate(cv=True, progress=not args.json)
    result["heldout"] = heldout_table(fit=result)
    text = fit_markdown(result)
    if args.out:
        import json

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_model_fit.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        (out / "cost_model_fit.md").write_text(text)
        write_fitted(result, out / "fitted_params.json")
        text += f"\nwrote {out}/cost_model_fit.json, cost_model_fit.md and fitted_params.json\n"
    return result, text.rstrip("\n")


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.errors import UsageError

    if args.list_devices:
        return _devices()
    if args.fit_cost_model:
        return _fit(args)
    if args.source is None:
        raise UsageError("name a bundle folder (or, with --device, a model name)")
    if args.device is not None:
        from s2dit_deploy.targets.devices import get_device

        get_device(args.device)  # unknown devices list the known ones (exit 2) before any work
        check_precision(args.precision)
        _check_out(args.out, ("device_estimate.json", "device_estimate.md", "device_estimate.png"), args.force)
        from s2dit_deploy.bench.device_report import estimate, to_markdown, write_report

        if args.commit_fidelity and args.fidelity_chunks < 2:
            raise UsageError("--fidelity-chunks must be >= 2: the commit mode changes only the chunks after the first")
        rep = estimate(args.source, args.device, args.precision, checkpoint=args.checkpoint, steps=args.steps)
        if args.commit_fidelity:
            from s2dit_deploy.bench.commit_pass import commit_fidelity

            model = rep["model"] if Path(str(args.source)).is_dir() and args.checkpoint is None else args.source
            rep["commit_fidelity"] = commit_fidelity(model, args.checkpoint, chunks=args.fidelity_chunks,
                                                     steps=args.steps)
        text = to_markdown(rep)
        if args.out:
            paths = write_report(rep, args.out)
            text += "\nwrote " + ", ".join(str(p) for p in paths) + "\n"
        return rep, text.rstrip("\n")
    for flag, value in (("--precision", args.precision), ("--checkpoint", args.checkpoint), ("--steps", args.steps),
                        ("--commit-fidelity", args.commit_fidelity or None)):
        if value is not None:
            raise UsageError(f"{flag} applies only with --device")
    _check_out(args.out, ("bench.json", "bench.md"), args.force)
    from s2dit_deploy.bench.harness import bench_bundle, to_markdown

    report = bench_bundle(args.source, repeats=args.repeats, warmup=args.warmup,
                          stages=tuple(args.stages) if args.stages else None,
                          profile=not args.no_profile, out_dir=args.out)
    text = to_markdown(report)
    if args.out:
        text += f"\nwrote {args.out}/bench.json and {args.out}/bench.md\n"
    return report, text.rstrip("\n")
