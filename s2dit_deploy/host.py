"""Run the streaming pipeline from compiled stages on this machine.

Adapters give each stage's ``Runner`` the interface the float modules have, so the very same
``model_zoo.pipeline.Pipeline`` (sampler, commit, decoder streaming) drives a bundle: any
difference between float and bundle output comes from the artifacts, not from a second copy of
the sampling loop. Both commit modes run on any bundle (``Pipeline.stream(commit=...)``): every
``dit_step`` call returns its cache entries, so ``last-step`` only skips the t = 0 pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .app_bundle.host_loop import HOST_LOOP_FILE, load_host_loop
from .bundle import Bundle
from .model_zoo.cache import push_entries
from .model_zoo.config import ModelConfig
from .model_zoo.pipeline import Pipeline
from .stages import dit_step_inputs

_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


def _np(t: torch.Tensor, spec: dict[str, Any]) -> np.ndarray:
    return t.detach().cpu().numpy().astype(_DTYPES.get(spec["dtype"], np.float32), copy=False)


def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class _Stage:
    def __init__(self, runner, contract: dict[str, Any]):
        self.runner = runner
        self.inputs = {s["name"]: s for s in contract["inputs"]}
        self.outputs = [s["name"] for s in contract["outputs"]]

    def __call__(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {n: _np(named[n], spec) for n, spec in self.inputs.items()}
        out = self.runner.run(arrays)
        return {n: _torch(out[n]) for n in self.outputs}


class TextEncoderHost(_Stage):
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().__call__({"input_ids": input_ids})["context"]


class DiTStepHost(_Stage):
    """Looks like ``S2DiT`` to the Pipeline: step / init_cache / push_cache."""

    def __init__(self, runner, contract, config: ModelConfig):
        super().__init__(runner, contract)
        self.config = config

    def init_cache(self, batch, latent_hw, stream, dtype=torch.float32):
        return {n[len("cache."):]: torch.zeros(s["shape"], dtype=dtype)
                for n, s in self.inputs.items() if n.startswith("cache.")}

    def step(self, x, t, context, cache, frame_offset=0):
        out = super().__call__(dit_step_inputs(self.config, x, t, context, cache, int(frame_offset)))
        entries = {n[len("entry."):]: v for n, v in out.items() if n.startswith("entry.")}
        return out["velocity"], entries

    push_cache = staticmethod(push_entries)


class DecoderHost(_Stage):
    def init_cache(self, batch, h, w, dtype=torch.float32):
        return [torch.zeros(s["shape"], dtype=dtype) for n, s in self.inputs.items() if n.startswith("cache.")]

    def __call__(self, z, cache):  # type: ignore[override]
        named = {"z": z, **{f"cache.{i}": c for i, c in enumerate(cache)}}
        out = super().__call__(named)
        return out["video"], [out[f"cache_out.{i}"] for i in range(len(cache))]


def bundle_pipeline(bundle: Bundle, float_pipe: Pipeline | None = None) -> Pipeline:
    """A Pipeline whose stages run from ``bundle``; stages the bundle lacks come from ``float_pipe``."""
    from s2dit_deploy.targets.base import get_target

    config = ModelConfig.from_dict(bundle.model["config"])
    if (bundle.path / HOST_LOOP_FILE).exists():  # the spec this host follows; an unknown version is refused
        load_host_loop(bundle.path)
    target = get_target(bundle.target)
    arts = bundle.artifacts

    def runner(stage):
        return target.load(arts[stage], bundle.path)

    missing = [s for s in ("text_encoder", "dit_step", "decoder") if s not in arts]
    if missing and float_pipe is None:
        raise ValueError(f"bundle {bundle.path} has no {missing} stage(s); pass a float pipeline for them")
    te = TextEncoderHost(runner("text_encoder"), arts["text_encoder"].contract) if "text_encoder" in arts else float_pipe.text_encoder
    dit = DiTStepHost(runner("dit_step"), arts["dit_step"].contract, config) if "dit_step" in arts else float_pipe.dit
    dec = DecoderHost(runner("decoder"), arts["decoder"].contract) if "decoder" in arts else float_pipe.decoder
    return Pipeline(config, te, dit, dec)
