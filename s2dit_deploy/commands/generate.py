"""`s2dit-deploy generate`: stream a video for a prompt and write it to .mp4, .gif or .npy (exact uint8 frames).

Each chunk is encoded as soon as it is decoded (the video never sits in memory whole), into a
temporary file beside the output that is renamed when complete.
"""

from __future__ import annotations

import argparse
import time

from . import _checks

NAME = "generate"
# model_zoo.pipeline.COMMIT_MODES, restated so --help loads no torch (tests/test_commit_pass.py checks they agree)
COMMIT_MODES = ("clean", "last-step")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="generate a video from a text prompt", description=__doc__)
    p.add_argument("prompt", help="text prompt")
    p.add_argument("--model", default="s2dit-small", help="registered model name (default: s2dit-small)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder instead of the bundled weights (with --bundle: the folder a "
                        "'user' bundle was compiled from, checked against its recorded sha256)")
    p.add_argument("--bundle", default=None,
                   help="run every stage from a compiled bundle folder (e.g. build/xnnpack) instead of float PyTorch")
    p.add_argument("--chunks", type=_checks.positive_int, default=4, help="number of 12-frame chunks (default 4)")
    p.add_argument("--steps", type=int, default=None, choices=(1, 2, 4), help="denoising steps per chunk")
    p.add_argument("--seed", type=_checks.seed, default=0, help="RNG seed, 0..2**63-1 (default 0)")
    p.add_argument("--commit", choices=COMMIT_MODES, default="clean",
                   help="cache entries pushed after each chunk: 'clean' (an extra DiT pass on the clean chunk "
                        "at t = 0, steps + 1 DiT calls per chunk; default) or 'last-step' (the last denoising "
                        "step's entries, steps DiT calls per chunk)")
    p.add_argument("--height", type=_checks.spatial, default=None,
                   help="override the model's output height (a positive multiple of 8)")
    p.add_argument("--width", type=_checks.spatial, default=None,
                   help="override the model's output width (a positive multiple of 8)")
    p.add_argument("-o", "--out", default="s2dit.mp4", help="output .mp4, .gif or .npy (exact uint8 frames, T x H x W x 3; default s2dit.mp4)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    from s2dit_deploy.errors import UsageError
    from s2dit_deploy.video_io import SUFFIXES, VideoWriter

    path = _checks.output_file(args.out, "--out", SUFFIXES, args.force)
    if args.bundle and (args.height or args.width):
        raise UsageError("--height/--width cannot change a compiled bundle's static shapes; recompile it "
                         "with `compile --resolution HxW`")
    if args.bundle:
        from s2dit_deploy.bundle import load_bundle
        from s2dit_deploy.host import bundle_pipeline
        from s2dit_deploy.weights_source import bundle_float_pipeline

        bundle = load_bundle(args.bundle)
        missing = [s for s in ("text_encoder", "dit_step", "decoder") if s not in bundle.artifacts]
        float_pipe = bundle_float_pipeline(bundle, args.checkpoint) if missing else None
        pipe = bundle_pipeline(bundle, float_pipe)
    else:
        from s2dit_deploy import load_pipeline

        pipe = load_pipeline(args.model, args.checkpoint, height=args.height, width=args.width)
    from s2dit_deploy.model_zoo.pipeline import dit_calls_per_chunk

    seconds = []
    t0 = time.perf_counter()
    with VideoWriter(path, pipe.config.fps) as writer:
        for frames in pipe.stream(args.prompt, args.chunks, args.steps, args.seed, progress=not args.json,
                                  commit=args.commit):
            writer.write(frames)
            seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    height, width = writer.shape
    result = {
        "output": str(path),
        "model": pipe.config.name,
        "bundle": args.bundle,
        "prompt": args.prompt,
        "frames": writer.frames,
        "height": int(height),
        "width": int(width),
        "fps": pipe.config.fps,
        "steps": args.steps or pipe.config.steps,
        "seed": args.seed,
        "commit": args.commit,
        "dit_calls_per_chunk": dit_calls_per_chunk(args.steps or pipe.config.steps, args.commit),
        "chunk_seconds": [round(s, 4) for s in seconds],
    }
    text = (f"wrote {path}: {writer.frames} frames {height}x{width} (HxW) @ {pipe.config.fps} fps "
            f"({args.chunks} chunks, commit {args.commit}, median {sorted(seconds)[len(seconds) // 2]:.2f} s/chunk on this CPU)")
    return result, text
