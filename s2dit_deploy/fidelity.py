"""``sd.validate``: run each stage of a bundle on this machine and compare with the float model.

Inputs are real: they are recorded from a float streaming run (the prompt's text tokens, every
denoising step of every chunk with its filled cache, each decoder call with its cache), so the
fidelity number reflects what a phone would see. The end-to-end stream is compared too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .bundle import Bundle, load_bundle
from .host import bundle_pipeline
from .model_zoo.pipeline import Pipeline, load_pipeline
from .stages import build_stages, dit_step_inputs

DEFAULT_PROMPT = "a red circle bouncing left on a black background"


def psnr(ref: np.ndarray | torch.Tensor, x: np.ndarray | torch.Tensor) -> float:
    """20 log10(max|ref| / rmse); inf when identical."""
    ref = np.asarray(ref, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    rmse = math.sqrt(float(np.mean((ref - x) ** 2)))
    peak = float(np.max(np.abs(ref)))
    return math.inf if rmse == 0 else 20 * math.log10(max(peak, 1e-12) / rmse)


class FidelityError(AssertionError):
    """An artifact fell below its PSNR floor."""


@dataclass
class StageFidelity:
    stage: str
    psnr_db: dict[str, float] = field(default_factory=dict)
    max_abs_err: dict[str, float] = field(default_factory=dict)
    calls: int = 0


def record_inputs(pipe: Pipeline, prompt: str, num_chunks: int, steps: int, seed: int) -> dict[str, list]:
    """Named inputs of every stage call in a float streaming run."""
    from .model_zoo.tokenizer import tokenize

    calls: dict[str, list] = {"text_encoder": [], "dit_step": [], "decoder": []}
    ids = tokenize(prompt, pipe.config.text_encoder.max_position_embeddings).to(torch.int32)
    calls["text_encoder"].append({"input_ids": ids})
    dit, dec = pipe.dit, pipe.decoder
    cfg = pipe.config

    class DiTSpy:
        def step(self, x, t, context, cache, frame_offset=0):
            calls["dit_step"].append(dit_step_inputs(cfg, x, t, context, cache, int(frame_offset)))
            return dit.step(x, t, context, cache, frame_offset)

        init_cache, push_cache = dit.init_cache, staticmethod(dit.push_cache)

    class DecSpy:
        def __call__(self, z, cache):
            calls["decoder"].append({"z": z, **{f"cache.{i}": c for i, c in enumerate(cache)}})
            return dec(z, cache)

        init_cache = dec.init_cache

    spy = Pipeline(cfg, pipe.text_encoder, DiTSpy(), DecSpy())
    spy.generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    return calls


def validate(bundle: Bundle | str, prompt: str = DEFAULT_PROMPT, num_chunks: int = 2, steps: int | None = None,
             seed: int = 0, floors: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-stage PSNR of the bundle vs float on recorded inputs, plus the decoded stream's PSNR."""
    from .targets.base import get_target

    bundle = load_bundle(bundle) if not isinstance(bundle, Bundle) else bundle
    name, ckpt = bundle.model["name"], bundle.model.get("checkpoint")
    cfg = bundle.model.get("config") or {}  # the resolution the bundle was compiled at
    pipe = load_pipeline(ckpt or name, height=cfg.get("height"), width=cfg.get("width"))
    steps = steps or pipe.config.steps
    stages = build_stages(pipe, tuple(bundle.artifacts))
    calls = record_inputs(pipe, prompt, num_chunks, steps, seed)
    target = get_target(bundle.target)
    report: dict[str, Any] = {"bundle": str(bundle.path), "target": bundle.target, "model": name, "stages": {}}
    for stage_name, art in bundle.artifacts.items():
        runner = target.load(art, bundle.path)
        stage = stages[stage_name]
        fid = StageFidelity(stage_name)
        refs: dict[str, list] = {}
        outs: dict[str, list] = {}
        for named in calls[stage_name]:
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
        report["stages"][stage_name] = fid.__dict__
    ref_video = pipe.generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    got_video = bundle_pipeline(bundle, pipe).generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    report["stream"] = {"num_chunks": num_chunks, "steps": steps,
                        "psnr_db": round(psnr(ref_video.astype(np.float32), got_video.astype(np.float32)), 2)}
    for key, floor in (floors or {}).items():
        stage, _, output = key.partition(".")
        value = report["stream"]["psnr_db"] if stage == "stream" else report["stages"][stage]["psnr_db"][output]
        if value < floor:
            raise FidelityError(f"{key}: PSNR {value:.2f} dB is below the floor {floor} dB")
    return report
