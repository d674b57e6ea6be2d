"""`s2dit-deploy generate`: stream a video for a prompt and write it to .mp4 or .gif."""

from __future__ import annotations

import argparse
import time

NAME = "generate"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="generate a video from a text prompt", description=__doc__)
    p.add_argument("prompt", help="text prompt")
    p.add_argument("--model", default="s2dit-small", help="registered model name (default: s2dit-small)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder instead of the bundled weights")
    p.add_argument("--bundle", default=None,
                   help="run every stage from a compiled bundle folder (e.g. build/xnnpack) instead of float PyTorch")
    p.add_argument("--chunks", type=int, default=4, help="number of 12-frame chunks (default 4)")
    p.add_argument("--steps", type=int, default=None, choices=(1, 2, 4), help="denoising steps per chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="override the model's output height")
    p.add_argument("--width", type=int, default=None, help="override the model's output width")
    p.add_argument("-o", "--out", default="s2dit.mp4", help="output .mp4 or .gif (default s2dit.mp4)")
    return p


def run(args: argparse.Namespace) -> tuple[object, str]:
    import numpy as np

    from s2dit_deploy import load_pipeline
    from s2dit_deploy.video_io import check_video_path, write_video

    check_video_path(args.out)
    if args.bundle:
        from s2dit_deploy.bundle import load_bundle
        from s2dit_deploy.host import bundle_pipeline

        if args.height or args.width:
            raise ValueError("--height/--width cannot change a compiled bundle's static shapes; recompile it")
        pipe = bundle_pipeline(load_bundle(args.bundle))
    else:
        pipe = load_pipeline(args.model, args.checkpoint, height=args.height, width=args.width)
    chunks, seconds = [], []
    t0 = time.perf_counter()
    for frames in pipe.stream(args.prompt, args.chunks, args.steps, args.seed, progress=not args.json):
        seconds.append(time.perf_counter() - t0)
        chunks.append(frames)
        t0 = time.perf_counter()
    video = np.concatenate(chunks, axis=0)
    path = write_video(args.out, video, pipe.config.fps)
    result = {
        "output": str(path),
        "model": pipe.config.name,
        "bundle": args.bundle,
        "prompt": args.prompt,
        "frames": int(video.shape[0]),
        "height": int(video.shape[1]),
        "width": int(video.shape[2]),
        "fps": pipe.config.fps,
        "steps": args.steps or pipe.config.steps,
        "seed": args.seed,
        "chunk_seconds": [round(s, 4) for s in seconds],
    }
    text = (f"wrote {path}: {video.shape[0]} frames {video.shape[2]}x{video.shape[1]} @ {pipe.config.fps} fps "
            f"({args.chunks} chunks, median {sorted(seconds)[len(seconds) // 2]:.2f} s/chunk on this CPU)")
    return result, text
