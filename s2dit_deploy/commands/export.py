"""`s2dit-deploy export`: the main job in one command, for one phone.

It picks the compile target (and SoC) from the device profile, compiles every stage, validates
the bundle against the float model and estimates the phone's latency with the calibrated cost
model, then writes one report folder:

    OUT/bundle/                 the compiled bundle (manifest, artifacts, host assets)
    OUT/validation.json / .md   per-stage and decoded-stream PSNR vs float, with verdicts
    OUT/device_estimate.*       the Table A3 estimate (json, md, png), labelled an estimate
    OUT/io_contract.json        every stage's inputs and outputs (names, shapes, dtypes)
    OUT/REPORT.md               the summary a reader starts from

The folder is built beside OUT and renamed into place when complete. A stage below its fidelity
floor still gets its report folder, then the command exits 4.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from . import _checks

NAME = "export"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="compile, validate and estimate device latency for one phone (the main job)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="s2dit-small", help="model name or checkpoint folder (default s2dit-small)")
    p.add_argument("--device", required=True, help="phone profile, e.g. iphone-16-pro-max or galaxy-s25 "
                                                   "(`s2dit-deploy bench --list-devices`)")
    p.add_argument("--quant", default=None,
                   help="QuantPlan JSON or preset (w8a8, w4a8-uniform, w4a8-seed, w4a8-mixed, w4a16); w4a8-mixed "
                        "runs (or reuses) the sensitivity calibration, as `calibrate` does")
    p.add_argument("--recalibrate", action="store_true",
                   help="a --quant plan made for other weights or another resolution is rebuilt instead of refused")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="checkpoint folder instead of the bundled weights")
    p.add_argument("--resolution", type=_checks.resolution, default=None, metavar="HxW",
                   help="video resolution to compile at (default: the checkpoint's)")
    p.add_argument("--chunks", type=_checks.positive_int, default=2, help="chunks of the validation stream (default 2)")
    p.add_argument("-o", "--out", default=None, help="report folder (default export/<model>-<device>)")
    p.add_argument("--force", action="store_true", help="replace an existing report folder at --out")
    return p


def _check_out(out: Path, force: bool) -> None:
    from s2dit_deploy.bundle import check_output_path
    from s2dit_deploy.errors import OutputExistsError

    check_output_path(out, force=True)  # refuses /, home, the working directory
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"--out {out} exists and is not empty; choose another folder or pass --force")
    _checks.writable_folder(out.parent if str(out.parent) else Path("."), "--out")


def _report_md(summary: dict, validation_text: str, estimate_md: str) -> str:
    v = summary["validation"]
    lines = [f"# Export: {summary['model']} for {summary['device']['name']}", "",
             f"- target: `{summary['target']}`" + (f" (SoC {summary['soc']})" if summary.get("soc") else ""),
             f"- quantization: {summary['quant'] or 'none (fp16/fp32 weights)'}",
             f"- bundle: `bundle/` ({summary['bundle_mb']:.1f} MB)",
             f"- fidelity: {'PASS' if v['passed'] else 'FAIL'} (decoded stream PSNR "
             f"{v['stream_psnr_db'] if v['stream_psnr_db'] is not None else '-'} dB)",
             f"- device latency: {summary['estimate_label']}; "
             f"{summary['fps_clean']:.1f} FPS with the clean commit pass, {summary['fps_last_step']:.1f} FPS with "
             "`--commit last-step`",
             f"- wall time on this machine: {summary['seconds']:.0f} s", "",
             "## Validation", "", "```", validation_text, "```", "", estimate_md]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.targets.devices import get_device

    dev = get_device(args.device)
    out = Path(args.out or Path("export") / f"{Path(str(args.model)).name}-{dev.id}")
    _check_out(out, args.force)
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        from s2dit_deploy.errors import UsageError

        raise UsageError(f"--checkpoint {args.checkpoint} is not a folder")
    from s2dit_deploy.bench.device_report import estimate, to_markdown, write_report
    from s2dit_deploy.compiler import compile_model
    from s2dit_deploy.fidelity import FidelityError, validate

    from .validate import render

    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        options = {"soc": dev.soc_id} if dev.target in ("executorch-qnn", "onnx-qnn") and dev.soc_id else {}
        height, width = args.resolution or (None, None)
        bundle = compile_model(args.model, target=dev.target, quant=args.quant, out_dir=tmp / "bundle",
                               checkpoint=args.checkpoint, progress=not args.json, height=height, width=width,
                               recalibrate=args.recalibrate, **options)
        failed = None
        try:
            vrep = validate(bundle, num_chunks=args.chunks, checkpoint=args.checkpoint)
        except FidelityError as exc:  # the report folder is still written, then exit 4
            vrep, failed = exc.report, exc
        vtext = (render(vrep) if vrep else str(failed)).replace(str(tmp), str(out))
        (tmp / "validation.json").write_text(json.dumps(vrep, indent=1, default=str) + "\n")
        (tmp / "validation.md").write_text(f"```\n{vtext}\n```\n")
        rep = estimate(bundle.path, dev)
        write_report(rep, tmp)
        contracts = {s: a.contract for s, a in bundle.artifacts.items()}
        (tmp / "io_contract.json").write_text(json.dumps(contracts, indent=1) + "\n")
        verdicts = (vrep or {}).get("verdicts", {})
        stream = (vrep or {}).get("stream") or {}
        summary = {
            "model": bundle.model["name"], "device": dev.as_dict(), "target": dev.target,
            "soc": options.get("soc"), "quant": bundle.info.get("quant"),
            "bundle_mb": sum(f.stat().st_size for f in (tmp / "bundle").rglob("*") if f.is_file()) / 1e6,
            "validation": {"passed": failed is None and all(v.get("passed", True) for v in verdicts.values()),
                           "stream_psnr_db": stream.get("psnr_db"),
                           "stages": {s: v.get("worst_psnr_db") for s, v in verdicts.items()}},
            "estimate_label": rep["label"],
            "ms_per_chunk_clean": rep["commit_modes"]["clean"]["ms_per_chunk"],
            "fps_clean": rep["commit_modes"]["clean"]["fps"],
            "fps_last_step": rep["commit_modes"]["last-step"]["fps"],
            "seconds": time.perf_counter() - t0,
        }
        (tmp / "REPORT.md").write_text(_report_md(summary, vtext, to_markdown(rep)))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["out"] = str(out)
    text = (f"wrote {out}/ (bundle, validation, device estimate, io contract, REPORT.md) in "
            f"{summary['seconds']:.0f} s\n{rep['label']}: {summary['ms_per_chunk_clean']:.0f} ms per chunk, "
            f"{summary['fps_clean']:.1f} FPS (clean commit), {summary['fps_last_step']:.1f} FPS (last-step commit)")
    if failed is not None:
        raise failed
    return summary, text
