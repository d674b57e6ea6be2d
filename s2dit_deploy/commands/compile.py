"""`s2dit-deploy compile`: compile every stage of a model for a target into an atomic bundle.

Every flag is checked before the model is loaded: the resolution (HxW, multiples of 8), the
stage list, the SoC (QNN targets only) and the output folder. ``--option KEY=VALUE`` values go to
the target as strings; its options dataclass parses and checks them (``--help-options`` lists them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _checks

NAME = "compile"
TARGET_NAMES = ("coreml", "executorch-xnnpack", "executorch-qnn", "onnx", "onnx-qnn", "coreai")
QNN_TARGETS = ("executorch-qnn", "onnx-qnn")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="compile a model for a device target", description=__doc__)
    p.add_argument("model", nargs="?", default="s2dit-small", help="model name or checkpoint folder")
    p.add_argument("--target", required=True, choices=TARGET_NAMES)
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="checkpoint folder (config.json + safetensors) instead of the model's bundled weights")
    p.add_argument("--quant", default=None,
                   help="QuantPlan JSON or preset (w8a8, w4a8-uniform, w4a8-seed, w4a8-mixed, w4a16); w4a8-mixed "
                        "runs (or reuses) the sensitivity calibration, as `calibrate` does")
    p.add_argument("--recalibrate", action="store_true",
                   help="a --quant plan made for other weights or another resolution is rebuilt instead of refused")
    p.add_argument("--soc", default=None, help="Snapdragon SoC, QNN targets only (e.g. SM8650, SM8750, SM8850)")
    p.add_argument("--stages", type=_checks.stage_list, default=("text_encoder", "dit_step", "decoder"),
                   help="comma-separated stages (default text_encoder,dit_step,decoder)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, repeatable (e.g. calibration_batches=8); see --help-options")
    p.add_argument("--help-options", action="store_true",
                   help="list the --target's options (name, type, default, doc) and exit")
    p.add_argument("--resolution", type=_checks.resolution, default=None, metavar="HxW",
                   help="video resolution to compile at, height x width, e.g. 192x320 (default: the checkpoint's)")
    p.add_argument("-o", "--out", default=None, help="bundle folder (default build/<target>)")
    p.add_argument("--force", action="store_true",
                   help="replace whatever is at --out, even if it is not a bundle")
    return p


def parse_resolution(text: str | None) -> tuple[int | None, int | None]:
    """'HxW' -> (height, width); (None, None) when not given. Raises UsageError naming the flag."""
    from s2dit_deploy.errors import UsageError

    if not text:
        return None, None
    try:
        return _checks.resolution(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--resolution {exc}") from None


def parse_options(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings -> {key: value}; values stay strings for the target's options class."""
    from s2dit_deploy.errors import UsageError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option {pair!r} must look like KEY=VALUE")
        if key in options:
            raise UsageError(f"--option {key} is given twice")
        options[key.strip()] = value
    return options


def options_text(target: str) -> tuple[list[dict], str]:
    from s2dit_deploy.targets.base import describe_options

    opts = describe_options(target)
    lines = [f"options of --target {target} (pass as --option KEY=VALUE):"]
    for o in opts:
        choices = f" one of {', '.join(map(str, o['choices']))};" if o.get("choices") else ""
        lines.append(f"  {o['name']:<24} {o['type']:<10} default {o['default']!r};{choices} {o['doc'] or ''}".rstrip())
    return opts, "\n".join(lines)


def check_args(args: argparse.Namespace) -> dict[str, str]:
    """Everything that can be checked without loading a model; the options to pass on."""
    from s2dit_deploy.errors import UsageError

    options = parse_options(args.option)
    if args.soc is not None:
        if args.target not in QNN_TARGETS:
            raise UsageError(f"--soc applies only to QNN targets ({', '.join(QNN_TARGETS)}), "
                             f"not --target {args.target}; drop --soc")
        from s2dit_deploy.socs import resolve_soc

        options["soc"] = resolve_soc(args.soc).name
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint} is not a folder")
    if args.out is not None:
        _checks.writable_folder(Path(args.out).parent if Path(args.out).parent != Path("") else Path("."), "--out")
    return options


def run(args: argparse.Namespace) -> tuple[object, str]:
    if args.help_options:
        return options_text(args.target)
    options = check_args(args)
    from s2dit_deploy.compiler import compile_model

    height, width = args.resolution or (None, None)
    bundle = compile_model(args.model, target=args.target, quant=args.quant, out_dir=args.out,
                           checkpoint=args.checkpoint, stages=tuple(args.stages), progress=not args.json,
                           height=height, width=width, force=args.force, recalibrate=args.recalibrate,
                           **options)
    manifest = bundle.manifest()
    lines = [f"bundle {bundle.path} ({args.target})"]
    for stage, info in manifest["info"]["compile"].items():
        files = ", ".join(manifest["artifacts"][stage]["files"])
        lines.append(f"  {stage:<13} {info['seconds']:>8.1f} s  +RSS {info['rss_increase_mb']:>8.0f} MB  {files}")
    return {"bundle": str(bundle.path), **manifest}, "\n".join(lines)
