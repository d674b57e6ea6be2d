"""Calibration inputs for quantized targets: the real inputs of every stage call of a float stream.

Shared by ``executorch-qnn`` and ``onnx-qnn``. Options carry either ``calibration`` (a mapping
``stage -> [named inputs]``) or ``pipeline`` (a float Pipeline; its streaming run is recorded with
``s2dit_deploy.fidelity.record_inputs`` once and reused for every stage of the compile).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from s2dit_deploy.stages import Stage

log = logging.getLogger(__name__)

# disjoint from the validation prompt (s2dit_deploy.fidelity.DEFAULT_PROMPT): the stream a quantized
# artifact is judged on is never the one it was calibrated on
DEFAULTS = {"prompt": "a red ball bouncing on a blue background", "num_chunks": 2, "seed": 1}
_RECORDED: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def recorded_inputs(pipe, prompt: str | None = None, num_chunks: int | None = None,
                    steps: int | None = None, seed: int | None = None) -> dict[str, list[dict]]:
    """``validate.record_inputs`` of a float streaming run, memoized per pipeline and settings."""
    from s2dit_deploy.recording import record_inputs

    key = (prompt or DEFAULTS["prompt"], num_chunks or DEFAULTS["num_chunks"],
           steps or pipe.config.steps, DEFAULTS["seed"] if seed is None else seed)
    per_pipe = _RECORDED.setdefault(pipe, {})
    if key not in per_pipe:
        log.info("recording calibration inputs: %d chunks x %d steps", key[1], key[2])
        per_pipe[key] = record_inputs(pipe, *key)
    return per_pipe[key]


def calibration_args(stage: Stage, options: dict[str, Any], max_samples: int | None = None) -> list[tuple]:
    """Positional input tuples (in the stage's contract order) to calibrate ``stage`` with."""
    calib = options.get("calibration")
    if calib is None:
        pipe = options.get("pipeline")
        if pipe is None:
            raise ValueError(
                f"quantizing stage {stage.name!r} needs real calibration inputs: pass "
                "pipeline=<float Pipeline> (its stream is recorded) or "
                "calibration={stage: [named inputs, ...]} in the compile options")
        calib = recorded_inputs(pipe, options.get("calibration_prompt"), options.get("calibration_chunks"),
                                options.get("calibration_steps"))
    samples = calib[stage.name] if isinstance(calib, dict) else list(calib)
    if not samples:
        raise ValueError(f"no calibration inputs for stage {stage.name!r}")
    limit = max_samples or int(options.get("calibration_samples", 0) or 0)
    if limit and len(samples) > limit:  # spread the kept samples over the whole stream
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    specs = {s.name: s for s in stage.inputs}
    return [tuple(torch.as_tensor(s[n]).to(getattr(torch, specs[n].dtype)).reshape(specs[n].shape)
                  for n in stage.input_names) for s in samples]
