"""Choose among allocations by the decoded stream they produce, not only by the step noise.

The allocator adds per-layer noises measured on a few DiT calls. Over a stream the error
compounds through the caches and through the sampler, and it depends on the prompt: measured on
s2dit-small, two plans with the same predicted step PSNR differed by 15 dB on one prompt's
4-chunk stream and were equal on another. So the workflow builds a few candidate allocations
(scheme sets, state weights) and keeps the one whose fake-quantized pipeline gives the best
min(step PSNR, decoded 4-chunk stream PSNR) over *all* calibration trajectories (their prompts and seeds: choosing on
them is calibration; the held-out evaluation uses the disjoint ``EVAL_PROMPTS``). The score is
the PSNR of the pooled MSE; the worst trajectory is reported next to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .capture import CalibrationSet
from .evaluate import plan_applied
from .fake_quant import WeightCache

log = logging.getLogger(__name__)


class StreamCheck:
    """Float reference streams of the calibration trajectories, then ``psnr(plan)`` per candidate."""

    def __init__(self, pipe, calib: CalibrationSet, num_chunks: int = 4, max_prompts: int = 4):
        meta = calib.meta
        self.pipe, self.num_chunks, self.steps = pipe, num_chunks, meta["steps"]
        self.runs = list(zip(meta["prompts"], meta["seeds"]))[:max_prompts]
        self.refs = [pipe.generate(p, num_chunks, self.steps, s).astype(np.float32) for p, s in self.runs]
        self.peak = max(float(np.abs(r).max()) for r in self.refs)
        self.cache = WeightCache()

    def psnr(self, plan) -> tuple[float, float]:
        """(PSNR of the pooled MSE, PSNR of the worst trajectory) over the calibration streams."""
        mses = []
        with plan_applied(self.pipe, plan, cache=self.cache):
            for (p, s), ref in zip(self.runs, self.refs):
                got = self.pipe.generate(p, self.num_chunks, self.steps, s).astype(np.float32)
                mses.append(float(np.mean((ref.astype(np.float64) - got) ** 2)))

        def db(m: float) -> float:
            return float("inf") if m <= 0 else 10 * np.log10(self.peak ** 2 / m)

        return db(float(np.mean(mses))), db(max(mses))


def choose(check: StreamCheck, candidates: Sequence[tuple[dict[str, Any], Any]],
           step_db: Callable[[Any], float]) -> tuple[Any, list[dict[str, Any]]]:
    """The candidate plan with the best min(step PSNR, stream PSNR) on calibration data, and the
    table of all of them: both must hold up, so the weaker of the two decides.

    ``candidates`` is a list of (settings dict, plan); ``step_db(plan)`` measures the DiT step PSNR
    on calibration calls; ties keep the earlier candidate."""
    rows, best, best_score = [], None, -np.inf
    for settings, plan in candidates:
        db, worst = check.psnr(plan)
        step = step_db(plan)
        score = min(db, step)
        rows.append({**settings, "calibration_stream_psnr_db": round(db, 2),
                     "worst_calibration_stream_psnr_db": round(worst, 2),
                     "calibration_step_psnr_db": round(step, 2),
                     "predicted_step_psnr_db": plan.provenance.get("predicted_psnr_db"), "score_db": round(score, 2)})
        log.info("candidate %s: calibration stream %.2f dB, step %.2f dB", settings, db, step)
        if score > best_score:
            best, best_score = plan, score
    return best, rows
