"""`s2dit-deploy validate`: PSNR of each compiled stage and of the decoded stream vs the float model."""

from __future__ import annotations

import argparse

NAME = "validate"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="check a bundle's fidelity against the float model", description=__doc__)
    p.add_argument("bundle", help="bundle folder written by `s2dit-deploy compile`")
    p.add_argument("--prompt", default=None, help="prompt of the recorded float run")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor", action="append", default=[], metavar="STAGE.OUTPUT=DB",
                   help="fail (exit 2) below this PSNR, e.g. dit_step.velocity=60 or stream=30")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.fidelity import DEFAULT_PROMPT, validate

    floors = {}
    for f in args.floor:
        key, sep, value = f.partition("=")
        if not sep:
            raise ValueError(f"--floor {f!r} must look like STAGE.OUTPUT=DB")
        floors[key] = float(value)
    report = validate(args.bundle, prompt=args.prompt or DEFAULT_PROMPT, num_chunks=args.chunks,
                      seed=args.seed, floors=floors)
    lines = [f"{report['bundle']} ({report['target']}, {report['model']})"]
    for stage, fid in report["stages"].items():
        for out, db in fid["psnr_db"].items():
            lines.append(f"  {stage:<13} {out:<28} PSNR {db:7.2f} dB  max err {fid['max_abs_err'][out]:.3g}")
    lines.append(f"  decoded stream ({report['stream']['num_chunks']} chunks): PSNR {report['stream']['psnr_db']:.2f} dB")
    return report, "\n".join(lines)
