"""Calibration capture: real stage inputs along real sampler trajectories, and per-layer statistics.

One float streaming run per (prompt, seed) with spies on the three stages records the named
inputs of every stage call (the text tokens; every denoising step of every chunk with its filled
caches, including the t = 0 commit pass; every decoder call with its cache) while forward hooks on
the float modules observe every quantizable layer's input (histogram, range, per-feature second
moment). Saved as ``calib.safetensors`` (tensors ``<stage>/<call>/<input>``, JSON metadata with
prompts, seeds, steps and a per-call index) plus ``stats.json``. NaN or inf anywhere is a
``CalibrationError`` that names the stage call and tensor, or the layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import CalibrationError  # noqa: F401 (re-exported)
from .fake_quant import input_feature_dim, quantizable_layers
from .observers import ActStats, LayerInputObserver
from .size import STAGE_MODULES

log = logging.getLogger(__name__)

CALIB_PROMPTS = (
    "a red ball bouncing on a blue background",
    "waves rolling onto a sandy beach at sunset",
    "a cat walking across a wooden floor",
    "city traffic at night with light trails",
    "a hot air balloon rising over green hills",
    "snow falling in a quiet pine forest",
    "a dog running through tall grass",
    "clouds drifting over a mountain lake",
)
# Evaluation prompts are disjoint from the calibration prompts (checked in evaluate.py).
EVAL_PROMPTS = (
    "a red circle bouncing left on a black background",
    "a paper boat floating down a rainy street",
    "fireworks bursting over a harbor",
    "a windmill turning slowly in a wheat field",
)


def _check_finite(t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "inf"
        raise CalibrationError(f"{bad} in captured calibration data: {where}")


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_hash(pipe) -> str:
    """Content hash of every stage's weights (plan and sensitivity cache key)."""
    h = hashlib.sha256(pipe.config.name.encode())
    for attr in STAGE_MODULES.values():
        h.update(tensors_hash(getattr(pipe, attr).state_dict()).encode())
    return h.hexdigest()[:16]


@dataclass
class CalibrationSet:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    stats: dict[str, dict[str, ActStats]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def hash(self) -> str:
        return self.meta.get("hash") or tensors_hash(self.tensors)[:16]

    def calls(self, stage: str) -> list[dict[str, torch.Tensor]]:
        out = []
        for i, info in enumerate(self.meta["calls"].get(stage, [])):
            prefix = f"{stage}/{i:04d}/"
            out.append({n: self.tensors[prefix + n] for n in info["inputs"]})
        return out

    def call_info(self, stage: str) -> list[dict[str, Any]]:
        return self.meta["calls"].get(stage, [])

    def provenance(self) -> dict[str, Any]:
        return {"calibration_hash": self.hash, "model_hash": self.meta.get("model_hash"),
                "calibration_prompts": list(self.meta["prompts"]), "calibration_seeds": list(self.meta["seeds"]),
                "num_chunks": self.meta["num_chunks"], "steps": self.meta["steps"]}

    def save(self, out_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.meta["hash"] = self.hash
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(out / "calib.safetensors.tmp"),
                  metadata={"meta": json.dumps(self.meta)})
        (out / "calib.safetensors.tmp").replace(out / "calib.safetensors")
        stats = {s: {n: st.to_dict() for n, st in layers.items()} for s, layers in self.stats.items()}
        (out / "stats.json").write_text(json.dumps(stats))
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationSet:
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(path)
        f = folder / "calib.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"no calibration set at {folder} (expected calib.safetensors)")
        with safe_open(str(f), "pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
        tensors = load_file(str(f))
        for k, v in tensors.items():
            _check_finite(v, k)
        stats = {}
        if (folder / "stats.json").is_file():
            raw = json.loads((folder / "stats.json").read_text())
            stats = {s: {n: ActStats(**d) for n, d in layers.items()} for s, layers in raw.items()}
        return cls(meta, tensors, stats, folder)


class _Observe:
    """Forward pre-hooks feeding a LayerInputObserver per quantizable layer of each stage module."""

    def __init__(self, pipe, stages):
        self.observers: dict[str, dict[str, LayerInputObserver]] = {}
        self.handles = []
        self.where = ""
        for stage in stages:
            mod = getattr(pipe, STAGE_MODULES[stage])
            obs = {}
            for name, layer in quantizable_layers(mod).items():
                if isinstance(layer, torch.nn.Embedding):
                    continue
                o = LayerInputObserver(f"{stage}:{name}", input_feature_dim(layer))
                obs[name] = o
                self.handles.append(layer.register_forward_pre_hook(
                    lambda _m, args, o=o: o(args[0], self.where)))
            self.observers[stage] = obs

    def close(self) -> dict[str, dict[str, ActStats]]:
        for h in self.handles:
            h.remove()
        return {s: {n: o.stats() for n, o in obs.items() if o.count} for s, obs in self.observers.items()}


def capture(pipe, prompts, seeds=None, num_chunks: int = 2, steps: int | None = None,
            stages=("text_encoder", "dit_step", "decoder"), out_dir: str | os.PathLike | None = None,
            progress: bool = True, observe: bool = True) -> CalibrationSet:
    """Record every stage call of float streaming runs and observe every layer's input."""
    from s2dit_deploy.model_zoo.pipeline import Pipeline

    from s2dit_deploy.stages import dit_step_inputs

    prompts = list(prompts)
    seeds = list(seeds) if seeds is not None else [1000 + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    steps = steps or pipe.config.steps
    cfg, dit, dec, te = pipe.config, pipe.dit, pipe.decoder, pipe.text_encoder
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, list] = {s: [] for s in stages}
    observe = _Observe(pipe, stages if observe else ())
    state = {"prompt": 0}

    def record(stage: str, named: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        if stage not in index:
            return
        i = len(index[stage])
        for n, t in named.items():
            _check_finite(t, f"{stage} call {i} ({info}) input {n!r}")
            tensors[f"{stage}/{i:04d}/{n}"] = t.detach().clone().contiguous()
        index[stage].append({**info, "prompt_index": state["prompt"], "inputs": list(named)})
        observe.where = f" ({stage} call {i}, prompt {state['prompt']})"

    class TESpy:
        def __call__(self, ids):
            record("text_encoder", {"input_ids": ids.to(torch.int32)}, {})
            out = te(ids)
            _check_finite(out, "text_encoder output 'context'")
            return out

    class DiTSpy:
        init_cache = dit.init_cache
        push_cache = staticmethod(dit.push_cache)

        def step(self, x, t, context, cache, frame_offset=0):
            info = {"t": float(t), "chunk": int(frame_offset) // cfg.stream.chunk_frames, "commit": float(t) == 0.0}
            record("dit_step", dit_step_inputs(cfg, x, t, context, cache, int(frame_offset)), info)
            v, entries = dit.step(x, t, context, cache, frame_offset)
            _check_finite(v, f"dit_step output 'velocity' (t={float(t):.3f})")
            return v, entries

    class DecSpy:
        init_cache = dec.init_cache

        def __call__(self, z, cache):
            record("decoder", {"z": z, **{f"cache.{i}": c for i, c in enumerate(cache)}}, {})
            return dec(z, cache)

    spy = Pipeline(cfg, TESpy(), DiTSpy(), DecSpy())
    try:
        for p_i, (prompt, seed) in enumerate(tqdm(list(zip(prompts, seeds)), desc="calibration capture",
                                                   unit="prompt", disable=not progress)):
            state["prompt"] = p_i
            spy.generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    finally:
        stats = observe.close()
    meta = {"model": cfg.name, "model_hash": model_hash(pipe), "prompts": prompts, "seeds": seeds,
            "num_chunks": num_chunks, "steps": steps, "calls": index}
    calib = CalibrationSet(meta, tensors, stats)
    if out_dir is not None:
        calib.save(out_dir)
    log.info("captured %s calls from %d prompts", {s: len(v) for s, v in index.items()}, len(prompts))
    return calib


def cache_root() -> Path:
    return Path(os.environ.get("S2DIT_CACHE", Path.home() / ".cache" / "s2dit-deploy"))


def default_calibration(pipe, num_prompts: int = 2, num_chunks: int = 2) -> CalibrationSet:
    """The default calibration set of a model (first prompts of CALIB_PROMPTS), cached by model hash."""
    folder = cache_root() / "calibration" / f"{pipe.config.name}-{model_hash(pipe)}-p{num_prompts}c{num_chunks}"
    if (folder / "calib.safetensors").is_file() and (folder / "stats.json").is_file():
        return CalibrationSet.load(folder)
    log.info("calibrating %s on %d default prompts -> %s", pipe.config.name, num_prompts, folder)
    return capture(pipe, CALIB_PROMPTS[:num_prompts], num_chunks=num_chunks, out_dir=folder, progress=False)
