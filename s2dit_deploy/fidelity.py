"""``sd.validate``: run each stage of a bundle on this machine and compare with the float model.

Inputs are real: they are recorded from a float streaming run (the prompt's text tokens, every
denoising step of every chunk with its filled cache, each decoder call with its cache), so the
fidelity number reflects what a phone would see. The end-to-end stream is compared too.

Every stage is judged against a floor: the target's default for that artifact's precision
(``target.default_floors``), overridden by ``floors``; the stream floor is the lowest of the
stages' "stream" defaults. A PSNR of ``inf`` (identical outputs) is listed under "identical".
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import FidelityFloorError, UsageError
from .metrics import psnr  # noqa: F401 (re-exported: sd.fidelity.psnr)
from .recording import record_inputs  # noqa: F401 (re-exported)

DEFAULT_PROMPT = "a red circle bouncing left on a black background"


class FidelityError(FidelityFloorError):
    """An artifact fell below its PSNR floor; ``report`` holds the full report all the same."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class StageFidelity:
    stage: str
    psnr_db: dict[str, float] = field(default_factory=dict)
    max_abs_err: dict[str, float] = field(default_factory=dict)
    calls: int = 0


def check_floor_keys(floors: dict[str, float], stages: dict[str, list[str]]) -> None:
    """Every override names 'stream', a stage of the bundle, or one of that stage's outputs."""
    for key in floors:
        stage, _, output = key.partition(".")
        if stage == "stream" and not output:
            continue
        if stage not in stages:
            raise UsageError(f"--floor {key}: no stage {stage!r} in this bundle; use one of "
                             f"{', '.join([*stages, 'stream'])}")
        if output and output not in stages[stage]:
            shown = ", ".join(stages[stage][:8]) + (", ..." if len(stages[stage]) > 8 else "")
            raise UsageError(f"--floor {key}: stage {stage} has no output {output!r}; outputs: {shown}")


def stage_floor(stage: str, output: str, defaults: dict[str, float], overrides: dict[str, float]) -> float | None:
    for value in (overrides.get(f"{stage}.{output}"), overrides.get(stage), defaults.get(output), defaults.get("*")):
        if value is not None:
            return float(value)
    return None


def judge(report: dict[str, Any], defaults: dict[str, dict[str, float]], overrides: dict[str, float]) -> list[str]:
    """Fill report["verdicts"]; return the failures' messages."""
    failures, verdicts = [], {}
    for stage, fid in report["stages"].items():
        rows = [(o, db, stage_floor(stage, o, defaults.get(stage, {}), overrides)) for o, db in fid["psnr_db"].items()]
        floored = [r for r in rows if r[2] is not None]
        worst = min(floored or rows, key=lambda r: (r[1] - (r[2] or 0.0)), default=None)
        bad = [r for r in floored if not r[1] >= r[2]]
        verdicts[stage] = {"passed": not bad, "worst_output": worst[0] if worst else None,
                           "worst_psnr_db": worst[1] if worst else None, "floor_db": worst[2] if worst else None,
                           "below_floor": {o: {"psnr_db": db, "floor_db": fl} for o, db, fl in bad}}
        failures += [f"{stage}.{o}: PSNR {db:.2f} dB is below the floor {fl:g} dB" for o, db, fl in bad]
    if report.get("stream") is not None:
        stream_defaults = [d["stream"] for d in defaults.values() if d.get("stream") is not None]
        floor = overrides.get("stream", min(stream_defaults) if stream_defaults else None)
        db = report["stream"]["psnr_db"]
        ok = floor is None or db >= floor
        verdicts["stream"] = {"passed": ok, "worst_psnr_db": db, "floor_db": floor}
        if not ok:
            failures.append(f"stream: PSNR {db:.2f} dB is below the floor {floor:g} dB")
    report["verdicts"] = verdicts
    report["passed"] = not failures
    return failures


def validate(bundle: Bundle | str, prompt: str = DEFAULT_PROMPT, num_chunks: int = 2, steps: int | None = None,
             seed: int = 0, floors: dict[str, float] | None = None, default_floors: bool = True,
             checkpoint: str | os.PathLike | None = None, max_calls: int | None = None,
             stream: bool = True) -> dict[str, Any]:
    """Per-stage PSNR of the bundle vs float on recorded inputs, plus the decoded stream's PSNR.

    ``max_calls`` scores only the first N recorded calls of each stage and ``stream=False`` skips the
    end-to-end stream: at paper scale one DiT call costs minutes on a laptop CPU, so a bounded
    validation (one chunk, one step, one call per stage) is what fits; the report says what ran.

    Raises :class:`FidelityError` (carrying the full report) when a stage or the stream is below
    its floor."""
    from .host import bundle_pipeline
    from .stages import build_stages
    from .targets.base import get_target
    from .weights_source import bundle_float_pipeline

    bundle = load_bundle(bundle) if not isinstance(bundle, Bundle) else bundle
    overrides = dict(floors or {})
    target = get_target(bundle.target)
    pipe = bundle_float_pipeline(bundle, checkpoint)
    steps = steps or pipe.config.steps
    stages = build_stages(pipe, tuple(bundle.artifacts))
    check_floor_keys(overrides, {s: list(stages[s].output_names) for s in bundle.artifacts})
    calls = record_inputs(pipe, prompt, num_chunks, steps, seed)
    filled = [s for s in ("text_encoder", "dit_step", "decoder") if s not in bundle.artifacts]
    report: dict[str, Any] = {"bundle": str(bundle.path), "target": bundle.target, "model": bundle.model["name"],
                              "stages": {}, "float_filled": filled,
                              "notes": [f"{s}: not in the bundle, the float model ran it" for s in filled]}
    defaults: dict[str, dict[str, float]] = {}
    for stage_name, art in bundle.artifacts.items():
        if default_floors and hasattr(target, "default_floors"):
            defaults[stage_name] = dict(target.default_floors(art))
        runner = target.load(art, bundle.path)
        stage = stages[stage_name]
        fid = StageFidelity(stage_name)
        refs: dict[str, list] = {}
        outs: dict[str, list] = {}
        t0 = time.perf_counter()
        for named in calls[stage_name][:max_calls]:
            ref = stage.run_float(named)
            got = runner.run({n: named[n].numpy() for n in stage.input_names})
            for o in stage.output_names:
                refs.setdefault(o, []).append(ref[o].numpy().ravel())
                outs.setdefault(o, []).append(np.asarray(got[o], dtype=np.float32).ravel())
            fid.calls += 1
        for o in refs:
            r, g = np.concatenate(refs[o]), np.concatenate(outs[o])
            fid.psnr_db[o] = round(psnr(r, g), 2)
            fid.max_abs_err[o] = float(np.max(np.abs(r - g)))
        report["stages"][stage_name] = {**fid.__dict__, "seconds": round(time.perf_counter() - t0, 2),
                                        "computed_in": target.numerics(art),
                                        "identical": [o for o, db in fid.psnr_db.items() if math.isinf(db)]}
    if not stream:
        report["stream"] = None
        report["notes"].append("stream: skipped (--no-stream); only the per-stage calls were scored")
        failures = judge(report, defaults, overrides)
        if failures:
            raise FidelityError("; ".join(failures), report)
        return report
    ref_video = pipe.generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    got_video = bundle_pipeline(bundle, pipe).generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    stream_db = round(psnr(ref_video.astype(np.float32), got_video.astype(np.float32)), 2)
    report["stream"] = {"num_chunks": num_chunks, "steps": steps, "psnr_db": stream_db,
                        "identical": math.isinf(stream_db)}
    failures = judge(report, defaults, overrides)
    if failures:
        raise FidelityError("; ".join(failures), report)
    return report
