"""Torch eager fp32 vs XNNPACK fp32 / int8 / int8-dynamic / 8da4w for one model's ``dit_step``.

Compiled ``.pte`` files are cached under ``cache_dir/<model>-<HxW>-<weight hash>/<scheme>/`` (with
the artifact's JSON) so repeated benchmark runs do not recompile (and new weights or shapes do). int8 is calibrated on real ``dit_step`` inputs
recorded from float streaming runs. Timing is interleaved round-robin (see
``harness.time_interleaved``) on the recorded inputs of a mid-stream call, single-threaded by
default so the eager / XNNPACK ratio is not dominated by thread scheduling on a shared host.

    python -m s2dit_deploy.bench.dit_step --model s2dit-small --schemes none int8 8da4w [--resolution 192x320]
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from .harness import time_interleaved

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("S2DIT_BENCH_CACHE", "build/bench-cache"))
SCHEMES = ("none", "int8", "8da4w")


def set_threads(n: int) -> None:
    """Threads for torch eager and for the ExecuTorch (XNNPACK) thread pool."""
    torch.set_num_threads(n)
    try:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(n)
    except (ImportError, AttributeError, RuntimeError) as exc:  # older wheels lack the hook
        log.warning("could not size the ExecuTorch thread pool: %s", exc)


def dit_step_setup(model: str, resolution: tuple[int, int] | None = None) -> tuple[Any, dict[str, list], Any]:
    """(dit_step Stage, recorded calls of every stage, pipeline) for ``model`` (at ``resolution``)."""
    from s2dit_deploy.model_zoo.pipeline import load_pipeline
    from s2dit_deploy.stages import build_stages
    from s2dit_deploy.targets.xnnpack.target import CALIBRATION_PROMPTS
    from s2dit_deploy.recording import record_inputs

    pipe = load_pipeline(model, height=resolution[0] if resolution else None,
                         width=resolution[1] if resolution else None)
    stage = build_stages(pipe, ("dit_step",))["dit_step"]
    calls = record_inputs(pipe, CALIBRATION_PROMPTS[0], num_chunks=2, steps=pipe.config.steps, seed=0)
    return stage, calls, pipe


def cache_key(pipe) -> str:
    """Cache folder name: model, resolution and weight hash (new weights or shapes recompile)."""
    from s2dit_deploy.quant.capture import model_hash

    return f"{pipe.config.name}-{pipe.config.height}x{pipe.config.width}-{model_hash(pipe)[:12]}"


def compiled_variant(key: str, scheme: str, stage, calls, cache_dir: Path = DEFAULT_CACHE):
    """(Artifact, folder) of the dit_step compiled with ``scheme``; compiled once per ``key``, then reused."""
    from s2dit_deploy.bundle import Artifact
    from s2dit_deploy.targets.xnnpack.target import TARGET

    folder = Path(cache_dir) / key / scheme
    meta = folder / "artifact.json"
    if meta.is_file() and (folder / "dit_step.pte").is_file():
        return Artifact.from_dict(json.loads(meta.read_text())), folder
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    art = TARGET.compile(stage, None, folder, {"xnnpack_quant": scheme, "calibration": calls})
    art.metadata["compile_seconds"] = round(time.perf_counter() - t0, 2)
    meta.write_text(json.dumps(art.to_dict(), indent=2) + "\n")
    return art, folder


def dit_step_callables(model: str, schemes=SCHEMES, cache_dir: Path = DEFAULT_CACHE,
                       resolution: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """No-arg callables {"eager-fp32": ..., "xnnpack-<scheme>": ...} on one real mid-stream input."""
    from s2dit_deploy.targets.xnnpack.target import TARGET

    stage, calls, pipe = dit_step_setup(model, resolution)
    key = cache_key(pipe)
    named = calls["dit_step"][len(calls["dit_step"]) // 2]
    args = tuple(named[n] for n in stage.input_names)
    module = stage.module

    def eager():
        with torch.no_grad():
            return module(*args)

    fns: dict[str, Any] = {"eager-fp32": eager}
    info: dict[str, Any] = {}
    for scheme in schemes:
        art, folder = compiled_variant(key, scheme, stage, calls, cache_dir)
        runner = TARGET.load(art, folder)
        tensors = runner.ordered(named)
        fns[f"xnnpack-{scheme}"] = (lambda r=runner, t=tensors: r.execute(t))
        d = art.metadata["delegation"]
        info[f"xnnpack-{scheme}"] = {"quant": art.quant, "pte_bytes": art.metadata["pte_bytes"],
                                     "compile_seconds": art.metadata.get("compile_seconds"),
                                     "delegated_nodes": d["delegated_nodes"], "portable_nodes": d["portable_nodes"],
                                     "fallback_ops": d["fallback_ops"]}
    return fns, info


def compare(model: str = "s2dit-small", schemes=SCHEMES, repeats: int = 15, warmup: int = 2, threads: int = 1,
            cache_dir: Path = DEFAULT_CACHE, resolution: tuple[int, int] | None = None) -> dict[str, Any]:
    set_threads(threads)
    fns, info = dit_step_callables(model, schemes, cache_dir, resolution)
    stats = time_interleaved(fns, repeats, warmup)
    eager = stats["eager-fp32"]["median_ms"]
    ratios = {k: round(eager / v["median_ms"], 2) for k, v in stats.items() if k != "eager-fp32"}
    return {"model": model, "resolution": list(resolution) if resolution else None, "threads": threads, "repeats": repeats, "warmup": warmup, "timings": stats,
            "eager_over_xnnpack": ratios, "variants": info,
            "unit": "ms per dit_step call (host CPU, interleaved runs)"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="s2dit-small")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--resolution", default=None, metavar="HxW",
                   help="video resolution, e.g. 192x320 (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON (default: a table)")
    a = p.parse_args(argv)
    res = tuple(int(v) for v in a.resolution.lower().split("x")) if a.resolution else None
    out = compare(a.model, tuple(a.schemes), a.repeats, a.warmup, a.threads, Path(a.cache_dir), res)
    if a.json:
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
        return
    lines = [f"{out['model']} dit_step, {out['threads']} thread(s), median of {out['repeats']} interleaved runs"]
    for name, st in out["timings"].items():
        ratio = out["eager_over_xnnpack"].get(name)
        lines.append(f"  {name:<20} {st['median_ms']:9.1f} ms" + (f"   eager/this = {ratio:.2f}x" if ratio else ""))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
