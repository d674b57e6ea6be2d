"""``sd.compile``: float checkpoint -> stages -> target artifacts in one atomic bundle."""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .bundle import Bundle, atomic_bundle
from .model_zoo.pipeline import load_pipeline
from .model_zoo.registry import resolve
from .stages import STAGE_NAMES, build_stages

log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resolve_plan(quant: Any, pipe, target: str):
    """None, a preset name, a plan.json path or a QuantPlan -> the plan object the target applies."""
    if quant is None:
        return None
    from .quant.plan import resolve_plan as _resolve  # the quant stage, before targets in the pipeline

    return _resolve(quant, pipe, target)


def compile_model(name: str, target: str = "coreml", quant: Any = None, out_dir: str | os.PathLike | None = None,
                  checkpoint: str | os.PathLike | None = None, stages: tuple[str, ...] = STAGE_NAMES,
                  progress: bool = True, height: int | None = None, width: int | None = None,
                  **options: Any) -> Bundle:
    """Compile every stage of a model for ``target`` into ``out_dir`` (default build/<target>).

    ``height`` / ``width`` compile at another video resolution than the checkpoint's (the weights
    do not depend on it; the static shapes of every stage do)."""
    from .targets.base import get_target

    tgt = get_target(target)  # fail on a bad target name before any heavy work
    config, folder = resolve(name, checkpoint)
    pipe = load_pipeline(name, checkpoint, height=height, width=width)
    plan = resolve_plan(quant, pipe, target)
    built = build_stages(pipe, tuple(stages))
    # a target may check its options and record what it needs from the float pipeline (e.g. real
    # calibration inputs) before any bundle folder exists
    run_options = tgt.prepare(pipe, plan, built, dict(options)) if hasattr(tgt, "prepare") else dict(options)
    out = Path(out_dir or Path("build") / target)
    model = {
        "name": config.name,
        "config": pipe.config.to_dict(),
        "checkpoint": str(folder) if folder else None,
    }
    with atomic_bundle(out, tgt.name, model) as bundle:
        bundle.info.update({"options": {k: str(v) for k, v in options.items()},
                            "quant": getattr(plan, "name", None) if plan is not None else None,
                            "compile": {}})
        for stage in tqdm(list(built.values()), desc=f"compile {config.name} -> {target}", unit="stage",
                          disable=not progress):
            t0 = time.perf_counter()
            # targets that calibrate (quantized QNN / ONNX-QNN / XNNPACK) record real inputs from it
            art = tgt.compile(stage, plan, bundle.path, {**run_options, "pipeline": pipe})
            bundle.artifacts[stage.name] = art
            bundle.info["compile"][stage.name] = {
                "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}
            log.info("compiled %s in %.1fs", stage.name, time.perf_counter() - t0)
        if plan is not None:  # the quantization report travels with the artifacts it describes
            from .quant.report import bundle_report
            from .quant.size import pipeline_layout

            bundle.info["quant_report"] = bundle_report(
                bundle.path / "quant", plan, pipeline_layout(pipe),
                {name: art.quant for name, art in bundle.artifacts.items()})
    return bundle
