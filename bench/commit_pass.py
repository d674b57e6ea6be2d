"""What the ``commit`` option costs in fidelity: ``last-step`` against the ``clean`` commit pass.

A streamed chunk costs steps + 1 DiT calls with ``commit="clean"`` (the Self-Forcing / CausVid
recipe: one more pass on the clean chunk at t = 0 whose cache entries are pushed) and steps calls
with ``commit="last-step"`` (the entries of the last denoising step are pushed instead), the count
of the paper's Table A3. The saving is one DiT call in steps + 1; the question is how far the
video moves, since the model was distilled attending to clean context. ``commit_fidelity`` streams
the same prompts from identical noise both ways (float PyTorch, ``load_pipeline``) and reports:

- the PSNR of the last-step frames against the clean ones (uint8 frames as float,
  20 log10(max|ref| / rmse), ref = clean), per chunk and overall; chunk 0 is identical in both
  modes by construction (commit only changes what later chunks attend to), so the per-chunk PSNR
  starts at chunk 1 and ``first_chunk_max_abs_diff`` says it is 0;
- the boundary jump of each mode: the mean absolute pixel difference between the last frame of
  chunk c and the first of chunk c + 1, over the mean absolute difference of consecutive frames
  inside chunks (1.0: a chunk boundary looks like any other frame step);
- the DiT calls per chunk of each mode, counted by a wrapper around ``dit.step``.

    python -m s2dit_deploy.bench.commit_pass --model s2dit-small --chunks 4      # JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

import numpy as np

from s2dit_deploy.metrics import psnr
from s2dit_deploy.model_zoo.pipeline import COMMIT_MODES, Pipeline, load_pipeline
from s2dit_deploy.model_zoo.sampler import SUPPORTED_STEPS

log = logging.getLogger(__name__)

PROMPTS = ("a red ball bouncing on a blue background", "a green square moving right on a black background",
           "white digits moving left on a gray background")


class CountingDiT:
    """The DiT with its ``step`` calls counted (init_cache / push_cache pass through)."""

    def __init__(self, dit):
        self.dit, self.calls = dit, 0
        self.init_cache, self.push_cache = dit.init_cache, dit.push_cache

    def step(self, *args, **kwargs):
        self.calls += 1
        return self.dit.step(*args, **kwargs)


def stream_counted(pipe: Pipeline, prompt: str, chunks: int, steps: int, seed: int,
                   commit: str) -> tuple[list[np.ndarray], list[int]]:
    """Each chunk's uint8 frames and the DiT calls made for it."""
    dit = CountingDiT(pipe.dit)
    counted = Pipeline(pipe.config, pipe.text_encoder, dit, pipe.decoder)
    frames, calls = [], []
    for chunk in counted.stream(prompt, chunks, steps, seed, commit=commit):
        frames.append(chunk)
        calls.append(dit.calls - sum(calls))
    return frames, calls


def _jumps(chunks: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """(mean |diff| across each chunk boundary, mean |diff| of each consecutive pair inside a chunk)."""
    f = [c.astype(np.float64) for c in chunks]
    boundary = [float(np.abs(f[c + 1][0] - f[c][-1]).mean()) for c in range(len(f) - 1)]
    inner = [float(np.abs(np.diff(c, axis=0)).mean(axis=(1, 2, 3)).mean()) for c in f]
    return boundary, inner


def _ratio(boundary: list[float], inner: list[float]) -> float:
    b, i = float(np.mean(boundary)), float(np.mean(inner))
    return b / i if i > 0 else (math.inf if b > 0 else 1.0)


def commit_fidelity(model: str = "s2dit-small", checkpoint: str | None = None, prompts: tuple[str, ...] = PROMPTS,
                    chunks: int = 4, seed: int = 0, steps: int | None = None) -> dict[str, Any]:
    """last-step vs clean commit on ``prompts`` (see the module docstring); every number is a float or int."""
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    if not prompts:
        raise ValueError("prompts must name at least one prompt")
    if chunks < 2:
        raise ValueError(f"chunks must be >= 2 (commit changes chunks after the first), got {chunks}")
    if steps is not None and steps not in SUPPORTED_STEPS:
        raise ValueError(f"steps must be one of {SUPPORTED_STEPS} or None, got {steps}")
    pipe = load_pipeline(model, checkpoint)
    steps = steps or pipe.config.steps
    videos: dict[str, list[list[np.ndarray]]] = {m: [] for m in COMMIT_MODES}
    calls: dict[str, list[int]] = {m: [] for m in COMMIT_MODES}
    for prompt in prompts:
        for mode in COMMIT_MODES:
            frames, n = stream_counted(pipe, prompt, chunks, steps, seed, mode)
            videos[mode].append(frames)
            calls[mode] += n
            log.info("%s: %r, commit %s: %d chunks, %s DiT calls", model, prompt, mode, chunks, n)
    ref, got = videos["clean"], videos["last-step"]
    first = max(int(np.abs(r[0].astype(np.int16) - g[0].astype(np.int16)).max()) for r, g in zip(ref, got))
    pooled = lambda vids, c: np.stack([v[c] for v in vids]).astype(np.float64)  # noqa: E731
    per_chunk = {str(c): psnr(pooled(ref, c), pooled(got, c)) for c in range(1, chunks)}
    whole = lambda vids: np.stack([np.concatenate(v) for v in vids]).astype(np.float64)  # noqa: E731
    jumps = {}
    for mode, vids in videos.items():
        b, i = zip(*(_jumps(v) for v in vids))
        jumps[mode] = _ratio([x for xs in b for x in xs], [x for xs in i for x in xs])
    result = {
        "model": model, "prompts": list(prompts), "chunks": chunks, "steps": steps, "seed": seed,
        "dit_calls_per_chunk": {m: c[0] if len(set(c)) == 1 else float(np.mean(c)) for m, c in calls.items()},
        "first_chunk_max_abs_diff": first,
        "psnr_db": psnr(whole(ref), whole(got)),
        "psnr_db_per_chunk": per_chunk,
        "boundary_jump": jumps,
        "per_prompt": [
            {"prompt": p, "psnr_db": psnr(np.concatenate(r).astype(np.float64), np.concatenate(g).astype(np.float64)),
             "boundary_jump": {m: _ratio(*_jumps(videos[m][k])) for m in COMMIT_MODES}}
            for k, (p, r, g) in enumerate(zip(prompts, ref, got))],
    }
    log.info("%s commit last-step vs clean: %.2f dB overall, per chunk %s; boundary jump %s; DiT calls per "
             "chunk %s", model, result["psnr_db"], {k: round(v, 2) for k, v in per_chunk.items()},
             {k: round(v, 3) for k, v in jumps.items()}, result["dit_calls_per_chunk"])
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="s2dit-small")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--prompt", action="append", default=None, help="repeatable (default: three built-in prompts)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, choices=SUPPORTED_STEPS)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the script's entry point, not a library
    res = commit_fidelity(a.model, a.checkpoint, tuple(a.prompt or PROMPTS), a.chunks, a.seed, a.steps)
    sys.stdout.write(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
