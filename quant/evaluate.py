"""Fidelity of a plan by fake quantization in the float model, on prompts disjoint from calibration.

Two numbers per plan: the PSNR of the ``dit_step`` velocity over every call of float
trajectories of the evaluation prompts, commit passes included (each call gets the float inputs,
so errors do not compound: the per-stage number ``sd.validate`` reports), and the PSNR of the decoded ``num_chunks``
stream generated end to end with every quantized stage (errors compound through the caches, as
on a phone).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import numpy as np
import torch

from .capture import CALIB_PROMPTS, EVAL_PROMPTS, CalibrationSet, capture
from .fake_quant import WeightCache, quantized
from .size import STAGE_MODULES

log = logging.getLogger(__name__)


@contextlib.contextmanager
def plan_applied(pipe, plan, stages=("text_encoder", "dit_step", "decoder"), cache: WeightCache | None = None):
    """Fake-quantize every listed stage of ``pipe`` by ``plan`` (in place, restored on exit)."""
    with contextlib.ExitStack() as stack:
        for s in stages:
            layers = plan.stages.get(s) if plan is not None else None
            if layers:
                stack.enter_context(quantized(getattr(pipe, STAGE_MODULES[s]), layers, cache,
                                              rounded=plan.rounded.get(s)))
        yield pipe


class Evaluator:
    """Float references computed once; then ``evaluate(plan)`` for as many plans as needed."""

    def __init__(self, pipe, prompts=EVAL_PROMPTS[:1], num_chunks: int = 4, steps: int | None = None,
                 seed: int = 0, calib: CalibrationSet | None = None):
        overlap = set(prompts) & set(calib.meta["prompts"] if calib is not None else CALIB_PROMPTS)
        if overlap:
            raise ValueError(f"evaluation prompts overlap the calibration prompts: {sorted(overlap)}")
        self.pipe, self.prompts, self.num_chunks, self.seed = pipe, list(prompts), num_chunks, seed
        self.steps = steps or pipe.config.steps
        ev = capture(pipe, self.prompts, seeds=[seed] * len(self.prompts), num_chunks=num_chunks,
                     steps=self.steps, stages=("dit_step",), progress=False, observe=False)
        from s2dit_deploy.stages import build_stages

        self.stage = build_stages(pipe, ("dit_step",))["dit_step"]
        self.inputs = ev.calls("dit_step")
        self.refs = [self.stage.run_float(x)["velocity"] for x in self.inputs]
        self.ref_videos = [pipe.generate(p, num_chunks, self.steps, seed) for p in self.prompts]
        self.cache = WeightCache()

    def dit_step_psnr(self, plan) -> float:
        with plan_applied(self.pipe, plan, ("dit_step",), self.cache):
            outs = [self.stage.run_float(x)["velocity"] for x in self.inputs]
        ref = torch.cat([r.flatten() for r in self.refs]).double()
        got = torch.cat([o.flatten() for o in outs]).double()
        rmse = float((ref - got).pow(2).mean().sqrt())
        return math.inf if rmse == 0 else 20 * math.log10(float(ref.abs().max()) / rmse)

    def stream_psnr(self, plan) -> float:
        from s2dit_deploy.metrics import psnr

        with plan_applied(self.pipe, plan, cache=self.cache):
            got = [self.pipe.generate(p, self.num_chunks, self.steps, self.seed) for p in self.prompts]
        return psnr(np.concatenate(self.ref_videos).astype(np.float32), np.concatenate(got).astype(np.float32))

    def evaluate(self, plan, stream: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"plan": getattr(plan, "name", "float"), "dit_step_psnr_db": round(self.dit_step_psnr(plan), 2)}
        if stream:
            out[f"stream_{self.num_chunks}chunk_psnr_db"] = round(self.stream_psnr(plan), 2)
        return out
