"""`s2dit-deploy bench`: time every stage of a compiled bundle on this machine's host runtime.

Reports the median and spread (p10 / p90 / IQR) over repeated runs with warm-up excluded, plus
per-operator profiles where the runtime has them (ETDump + Inspector for ExecuTorch). Each time
says what it measures: host CPU time, a reference executor's time, or emulator time; never phone
time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _checks

NAME = "bench"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="time each stage of a compiled bundle", description=__doc__)
    p.add_argument("bundle", help="bundle folder written by `s2dit-deploy compile`")
    p.add_argument("--repeats", type=_checks.positive_int, default=20, help="timed runs per stage (default 20)")
    p.add_argument("--warmup", type=_checks.non_negative_int, default=3, help="untimed warm-up runs per stage (default 3)")
    p.add_argument("--stage", action="append", dest="stages", default=None,
                   choices=("text_encoder", "dit_step", "decoder"),
                   help="only this stage (repeatable; default: every stage in the bundle)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-operator profile")
    p.add_argument("--out", default=None, help="also write bench.json and bench.md into this folder")
    p.add_argument("--force", action="store_true", help="replace bench.json / bench.md already in --out")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.errors import OutputExistsError, UsageError

    if args.out is not None:  # checked before any timing, so no run is lost to an unwritable folder
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; name a folder")
        _checks.writable_folder(out, "--out")
        taken = [n for n in ("bench.json", "bench.md") if (out / n).exists()]
        if taken and not args.force:
            raise OutputExistsError(f"--out {out} already holds {', '.join(taken)}; pass --force to replace them")
    from s2dit_deploy.bench.harness import bench_bundle, to_markdown

    report = bench_bundle(args.bundle, repeats=args.repeats, warmup=args.warmup,
                          stages=tuple(args.stages) if args.stages else None,
                          profile=not args.no_profile, out_dir=args.out)
    text = to_markdown(report)
    if args.out:
        text += f"\nwrote {args.out}/bench.json and {args.out}/bench.md\n"
    return report, text.rstrip("\n")
