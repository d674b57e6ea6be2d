"""`s2dit-deploy compile`: compile every stage of a model for a target into an atomic bundle."""

from __future__ import annotations

import argparse

NAME = "compile"
TARGET_NAMES = ("coreml", "executorch-xnnpack", "executorch-qnn", "onnx", "onnx-qnn")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="compile a model for a device target", description=__doc__)
    p.add_argument("model", nargs="?", default="s2dit-small", help="model name or checkpoint folder")
    p.add_argument("--target", required=True, choices=TARGET_NAMES)
    p.add_argument("--quant", default=None, help="QuantPlan JSON or preset (w8a8, w4a8-uniform, w4a8-mixed, w4a16)")
    p.add_argument("--soc", default=None, help="Snapdragon SoC for QNN targets (SM8650, SM8750, SM8850)")
    p.add_argument("--stages", default="text_encoder,dit_step,decoder", help="comma-separated stages")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="target-specific option, repeatable (e.g. xnnpack_quant=int8)")
    p.add_argument("--resolution", default=None, metavar="HxW",
                   help="video resolution to compile at, e.g. 192x320 (default: the checkpoint's)")
    p.add_argument("-o", "--out", default=None, help="bundle folder (default build/<target>)")
    return p


def parse_resolution(text: str | None) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise ValueError(f"--resolution {text!r} must look like HEIGHTxWIDTH, e.g. 192x320")
    return int(h), int(w)


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r} must look like KEY=VALUE")
        options[key] = value
    return options


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.compiler import compile_model

    options = parse_options(args.option)
    if args.soc:
        options["soc"] = args.soc
    height, width = parse_resolution(args.resolution)
    bundle = compile_model(args.model, target=args.target, quant=args.quant, out_dir=args.out,
                           stages=tuple(s for s in args.stages.split(",") if s), progress=not args.json,
                           height=height, width=width, **options)
    manifest = bundle.manifest()
    lines = [f"bundle {bundle.path} ({args.target})"]
    for stage, info in manifest["info"]["compile"].items():
        files = ", ".join(manifest["artifacts"][stage]["files"])
        lines.append(f"  {stage:<13} {info['seconds']:>8.1f} s  peak RSS {info['peak_rss_mb']:>8.0f} MB  {files}")
    return {"bundle": str(bundle.path), **manifest}, "\n".join(lines)
