"""`s2dit-deploy init MODEL -o DIR`: write a seeded checkpoint folder for a registered model.

No trained paper-scale weights exist, so paper-scale figures start from a seeded checkpoint laid
out exactly like a trained one (config.json + dit / text_encoder / decoder .safetensors). It is
generated tensor by tensor (s2dit-mobile's 1.83B DiT never sits in memory whole) and written
atomically; then ``compile``, ``validate``, ``bench`` and ``calibrate`` take it as ``--checkpoint DIR``.
An existing DIR is replaced only when it is a checkpoint folder (nothing else in it) or with --force.
"""

from __future__ import annotations

import argparse

from . import _checks

NAME = "init"
DTYPE_NAMES = ("fp16", "bf16", "fp32")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="write a seeded checkpoint folder for a registered model", description=__doc__)
    p.add_argument("model", help="registered model name (see `s2dit-deploy models`), e.g. s2dit-mobile")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--seed", type=_checks.seed, default=0, help="RNG seed, 0..2**63-1 (default 0)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16",
                   help="floating dtype of the stored weights (default fp16)")
    p.add_argument("--force", action="store_true",
                   help="replace DIR even when it holds files that are not a checkpoint")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.api import init_checkpoint
    from s2dit_deploy.errors import UsageError
    from s2dit_deploy.model_zoo.registry import UnknownModelError, get_card

    try:
        get_card(args.model)
    except UnknownModelError as exc:
        raise UsageError(f"argument MODEL: {exc}") from None
    record = init_checkpoint(args.model, args.out, seed=args.seed, dtype=args.dtype, force=args.force,
                             progress=not args.json)
    lines = [f"checkpoint {record['path']} ({record['model']}, {record['dtype']}, seed {record['seed']}, "
             f"{record['params']:,} params, {record['seconds']:.1f} s)"]
    lines += [f"  {f['name']:<26} {f['bytes'] / 1e6:>10.1f} MB  sha256 {f['sha256'][:16]}" for f in record["files"]]
    lines.append(f"use it with: s2dit-deploy compile {record['model']} --checkpoint {record['path']} --target ...")
    return record, "\n".join(lines)
