"""``sd.compile``: float checkpoint -> stages -> target artifacts in one atomic bundle.

The output path is checked before any work, and every artifact is smoke-run once on its stage's
example inputs (and checked against the plan) before the bundle is swapped into place, so a
committed bundle always loads and runs."""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .bundle import Bundle, atomic_bundle, check_output_path
from .errors import CompileCheckError, ToolchainUnavailable
from .memory_budget import check_memory_budget
from .model_zoo.checkpoint import checkpoint_digest
from .model_zoo.pipeline import load_pipeline
from .model_zoo.registry import CARDS, load_dtypes, resolve
from .quant.plan import QuantPlan
from .stages import STAGE_NAMES, Stage, build_stages

log = logging.getLogger(__name__)


def _process_peak_rss_mb() -> float:
    """Process-wide peak RSS since start (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Peak resident memory during a ``with`` block minus the RSS at its start (MiB).

    A daemon thread samples /proc/self/statm; without /proc it falls back to the growth of the
    process-wide peak, which undercounts a stage that stays below an earlier peak."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.increase_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _current_rss_mb()
            if rss is not None:
                self._peak = max(self._peak, rss)

    def __enter__(self) -> "RssSampler":
        self._start = _current_rss_mb()
        self._start_peak = _process_peak_rss_mb()
        self._peak = self._start or 0.0
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        if self._start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._start is not None:
            self._thread.join()
            self._peak = max(self._peak, _current_rss_mb() or 0.0)
            self.increase_mb = max(0.0, self._peak - self._start)
        else:
            self.increase_mb = max(0.0, _process_peak_rss_mb() - self._start_peak)


def _memory_record(est: dict[str, Any]) -> dict[str, Any]:
    """The budget check's estimate in the manifest (GiB, with the factor's source)."""
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return {"estimated_peak_gib": gib(est["peak"]), "bound_gib": gib(est["bound"]),
            "worst_stage": est["worst_stage"], "weights_dtype": est["dtype"],
            "per_stage_gib": {k: gib(v["peak"]) for k, v in est["stages"].items()},
            "factor_source": est["factor"]["source"]}


def resolve_plan(quant: Any, pipe, target: str, recalibrate: bool = False):
    """None, a preset name, a plan.json path or a QuantPlan -> the plan object the target applies
    (``recalibrate``: rebuild a plan made for other weights or another resolution instead of refusing it)."""
    if quant is None:
        return None
    from .targets.base import QuantPreset, quant_presets

    if isinstance(quant, str) and quant in quant_presets(target):  # e.g. QNN's PT2E 8a8w: the target builds it
        return QuantPreset(quant)
    from .quant.resolve import resolve_plan as _resolve

    return _resolve(quant, pipe, target, recalibrate)


def checkpoint_record(name: str, checkpoint: Any, folder: Path | None) -> dict[str, Any]:
    """Where the weights came from, without any absolute path: the manifest must be portable."""
    if folder is None:
        return {"source": "seeded", "name": None, "sha256": None}
    user = checkpoint is not None or str(name) not in CARDS
    return {"source": "user" if user else "bundled", "name": Path(folder).name,
            "sha256": checkpoint_digest(folder)}


def smoke_run(tgt: Any, stage: Stage, art: Any, bundle_dir: Path, plan: Any) -> dict[str, Any]:
    """Run a fresh artifact once on the stage's example inputs; ``CompileCheckError`` if any output
    is missing, mis-shaped or not finite, or the artifact does not carry the planned bits."""
    if plan is not None:
        mismatches = tgt.check_plan(art, bundle_dir, plan)
        if mismatches:
            shown = "; ".join(mismatches[:5]) + (f"; ... ({len(mismatches)} in all)" if len(mismatches) > 5 else "")
            raise CompileCheckError(f"stage {stage.name}: the {tgt.name} artifact does not match the "
                                    f"quantization plan: {shown}")
    try:
        runner = tgt.load(art, bundle_dir)
    except ToolchainUnavailable as exc:  # e.g. a device-only runtime: nothing to run it on here
        log.warning("smoke run of %s skipped: %s", stage.name, exc)
        return {"smoke_run": f"skipped: {exc}"}
    inputs = {n: t.detach().cpu().numpy() for n, t in zip(stage.input_names, stage.example_inputs)}
    try:
        outs = runner.run(inputs)
    except Exception as exc:
        raise CompileCheckError(f"stage {stage.name}: the {tgt.name} artifact failed its smoke run on the "
                                f"example inputs: {type(exc).__name__}: {exc}") from exc
    for spec in art.contract.get("outputs", []):
        name, shape = spec["name"], tuple(spec["shape"])
        if name not in outs:
            raise CompileCheckError(f"stage {stage.name}: smoke run returned no output {name!r} "
                                    f"(got {sorted(outs)})")
        value = np.asarray(outs[name])
        if tuple(value.shape) != shape:
            raise CompileCheckError(f"stage {stage.name}: output {name!r} has shape {tuple(value.shape)}, "
                                    f"the contract says {shape}")
        if np.issubdtype(value.dtype, np.number) and not np.isfinite(value.astype(np.float64)).all():
            bad = int((~np.isfinite(value.astype(np.float64))).sum())
            raise CompileCheckError(f"stage {stage.name}: output {name!r} has {bad} non-finite values "
                                    "(NaN/inf) on the example inputs")
    return {"smoke_run": "ok"}


def compile_model(name: str, target: str = "coreml", quant: Any = None, out_dir: str | os.PathLike | None = None,
                  checkpoint: str | os.PathLike | None = None, stages: tuple[str, ...] = STAGE_NAMES,
                  progress: bool = True, height: int | None = None, width: int | None = None,
                  force: bool = False, memory_bound_bytes: int | None = None, recalibrate: bool = False,
                  **options: Any) -> Bundle:
    """Compile every stage of a model for ``target`` into ``out_dir`` (default build/<target>).

    ``out_dir`` must be missing, empty or an existing bundle unless ``force``. ``height`` /
    ``width`` compile at another video resolution than the checkpoint's (the weights do not depend
    on it; the static shapes of every stage do)."""
    from .targets.base import get_target

    tgt = get_target(target)  # fail on a bad target name before any heavy work
    tgt.parse_options(options)  # ... on an unknown or malformed option
    out = check_output_path(out_dir or Path("build") / target, force)  # ... and on an unsafe output
    config, folder = resolve(name, checkpoint)
    # ... and on a compile that would not fit in memory (estimated from the headers, nothing loaded)
    memory = check_memory_budget(config.with_resolution(height or config.height, width or config.width),
                                 tgt.name, tuple(stages), options, dtype=load_dtypes(config, folder),
                                 bound_bytes=memory_bound_bytes)
    pipe = load_pipeline(name, checkpoint, height=height, width=width)
    plan = resolve_plan(quant, pipe, target, recalibrate)
    if isinstance(plan, QuantPlan) and plan.rounded:  # GPTQ-rounded weights go into the float model once,
        from .quant.rounded_weights import install  # so every target exports exactly what was evaluated

        install(pipe, plan)
    built = build_stages(pipe, tuple(stages))
    # a target checks its options and records what it needs from the float pipeline (e.g. real
    # calibration inputs) before any bundle folder exists
    run_options = tgt.prepare(pipe, plan, built, dict(options))
    model = {"name": config.name, "config": pipe.config.to_dict(),
             "checkpoint": checkpoint_record(name, checkpoint, folder)}
    with atomic_bundle(out, tgt.name, model, force=force) as bundle:
        bundle.info.update({"options": {k: str(v) for k, v in options.items()},
                            "quant": getattr(plan, "name", None) if plan is not None else None,
                            "compile": {}, "memory_estimate": _memory_record(memory)})
        for stage in tqdm(list(built.values()), desc=f"compile {config.name} -> {target}", unit="stage",
                          disable=not progress):
            t0 = time.perf_counter()
            with RssSampler() as rss:
                # targets that calibrate (quantized QNN / ONNX-QNN / XNNPACK) record real inputs from it
                stage_options = {**run_options, "pipeline": pipe}
                shards = tgt.shard_count(stage, plan, stage_options)
                if shards > 1:  # N chained programs (QNN context / flatbuffer limits)
                    from .targets.sharding import compile_sharded

                    art = compile_sharded(tgt, stage, plan, bundle.path, stage_options, shards)
                else:  # fp16/bf16 weights: the target converts an fp32 copy (Core ML: chunk by chunk)
                    art = tgt.compile(tgt.float_stage(stage), plan, bundle.path, stage_options)
            seconds = time.perf_counter() - t0
            bundle.artifacts[stage.name] = art
            check = smoke_run(tgt, stage, art, bundle.path, plan)
            bundle.info["compile"][stage.name] = {
                "seconds": round(seconds, 3), "rss_increase_mb": round(rss.increase_mb, 1),
                "process_peak_rss_mb": round(_process_peak_rss_mb(), 1), **check}
            log.info("compiled %s in %.1fs (+%.0f MiB RSS)", stage.name, seconds, rss.increase_mb)
        if all(s in bundle.artifacts for s in STAGE_NAMES):  # everything an app needs besides the programs
            from .app_bundle import write_app_assets

            bundle.info["host_assets"] = write_app_assets(
                bundle.path, pipe.config, tgt.name, bundle.artifacts,
                soc=getattr(tgt.parse_options(options), "soc", None))
        if isinstance(plan, QuantPlan):  # a plan's report travels with the artifacts it describes
            from .quant.report import bundle_report
            from .quant.size import pipeline_layout

            bundle.info["quant_report"] = bundle_report(
                bundle.path / "quant", plan, pipeline_layout(pipe),
                {name: art.quant for name, art in bundle.artifacts.items()})
    return bundle
