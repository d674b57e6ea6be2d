"""`s2dit-deploy validate`: PSNR of each compiled stage and of the decoded stream vs the float model.

Each stage is judged against its target's default floor for that artifact's precision (or
``--floor``); below a floor the command exits 4 after printing the full table and verdicts.
"""

from __future__ import annotations

import argparse
import math

from . import _checks

NAME = "validate"
WORST_SHOWN = 5


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="check a bundle's fidelity against the float model", description=__doc__)
    p.add_argument("bundle", help="bundle folder written by `s2dit-deploy compile`")
    p.add_argument("--checkpoint", default=None,
                   help="weights folder of a bundle compiled from a user checkpoint (its sha256 is checked)")
    p.add_argument("--prompt", default=None, help="prompt of the recorded float run")
    p.add_argument("--chunks", type=_checks.positive_int, default=2, help="chunks of the recorded run (default 2)")
    p.add_argument("--steps", type=int, default=None, choices=(1, 2, 4),
                   help="denoising steps per chunk of the recorded run (default: the model's)")
    p.add_argument("--max-calls", type=_checks.positive_int, default=None, metavar="N",
                   help="score only the first N recorded calls of each stage (paper scale: a DiT call takes minutes)")
    p.add_argument("--no-stream", action="store_true",
                   help="skip the end-to-end stream comparison (per-stage calls only)")
    p.add_argument("--seed", type=_checks.seed, default=0, help="RNG seed, 0..2**63-1 (default 0)")
    p.add_argument("--floor", action="append", default=[], metavar="STAGE[.OUTPUT]=DB",
                   help="override a floor (exit 4 below it): dit_step.velocity=60, decoder=30 or stream=30")
    p.add_argument("--no-floors", action="store_true", help="report only; apply no default floors")
    p.add_argument("--all-outputs", action="store_true",
                   help=f"list every output (default: the {WORST_SHOWN} worst per stage and a count)")
    return p


def parse_floors(items: list[str]) -> dict[str, float]:
    from s2dit_deploy.errors import UsageError

    floors = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            db = float(value)
        except ValueError:
            db = math.nan
        if not sep or not key or not math.isfinite(db):
            raise UsageError(f"--floor {item!r} must look like STAGE.OUTPUT=DB, STAGE=DB or stream=DB "
                             "with DB a finite number")
        floors[key] = db
    return floors


def _db(value: float | None) -> str:
    if value is None:
        return "-"
    return "identical" if math.isinf(value) else f"{value:.2f} dB"


def render(report: dict, all_outputs: bool = False) -> str:
    lines = [f"{report['bundle']} ({report['target']}, {report['model']})"]
    for stage, fid in report["stages"].items():
        rows = sorted(fid["psnr_db"].items(), key=lambda kv: kv[1])
        shown = rows if all_outputs or len(rows) <= WORST_SHOWN + 1 else rows[:WORST_SHOWN]
        v = report.get("verdicts", {}).get(stage, {})
        must = {*v.get("below_floor", {}), v.get("worst_output")} - {o for o, _ in shown} - {None}
        shown = shown + [r for r in rows if r[0] in must]  # a failing output is always listed
        for out, db in shown:
            lines.append(f"  {stage:<13} {out:<28} PSNR {_db(db):>12}  max err {fid['max_abs_err'][out]:.3g}")
        if len(shown) < len(rows):
            rest = min(db for o, db in rows if o not in {o for o, _ in shown})
            lines.append(f"  {stage:<13} ... {len(rows) - len(shown)} more outputs, all >= "
                         f"{_db(rest)} (--all-outputs lists them)")
    for note in report.get("notes", []):
        lines.append(f"  {note}")
    s = report["stream"]
    if s is not None:
        lines.append(f"  decoded stream ({s['num_chunks']} chunks): PSNR {_db(s['psnr_db'])}")
    for stage, fid in report["stages"].items():
        lines.append(f"  {stage}: {fid['calls']} call(s) scored in {fid.get('seconds', 0):.1f} s, computed in "
                     f"{fid.get('computed_in', '?')}")
    verdicts = report.get("verdicts", {})
    if verdicts:
        lines.append("")
    for stage, v in verdicts.items():
        word = "PASS" if v["passed"] else "FAIL"
        what = f"worst {v['worst_output']} " if v.get("worst_output") else ""
        if v.get("floor_db") is None:
            lines.append(f"{stage:<13} {word}  {what}{_db(v['worst_psnr_db'])} (no floor)")
        else:
            op = ">=" if v["passed"] else "<"
            lines.append(f"{stage:<13} {word}  {what}{_db(v['worst_psnr_db'])} {op} floor {v['floor_db']:g} dB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.fidelity import DEFAULT_PROMPT, FidelityError, validate

    floors = parse_floors(args.floor)
    try:
        report = validate(args.bundle, prompt=args.prompt or DEFAULT_PROMPT, num_chunks=args.chunks,
                          steps=args.steps, seed=args.seed, floors=floors, default_floors=not args.no_floors,
                          checkpoint=args.checkpoint, max_calls=args.max_calls, stream=not args.no_stream)
    except FidelityError as exc:
        if exc.report is not None:
            exc.text = render(exc.report, args.all_outputs)
        raise
    return report, render(report, args.all_outputs)
