"""Deployment stages: flat-tensor wrappers of the float modules with a named I/O contract.

Every target compiles the same three graphs:
- ``text_encoder``: ``input_ids`` (1, 77) int32 -> ``context`` (1, 77, text_dim).
- ``dit_step``: one denoising step of one chunk. Inputs ``x``, ``t``, ``context``, the RoPE tables
  of the chunk (computed on the host in fp32, exact at any stream position) and every cache tensor
  ``cache.<key>``; outputs ``velocity`` and this chunk's entries ``entry.<key>``. The host commits
  entries with ``model_zoo.cache.push_entries`` after the t = 0 pass (Self-Forcing commit), so the
  compiled graph never copies a whole window.
- ``decoder``: ``z`` (1, 16, 3, h, w) + ``cache.<i>`` -> ``video`` + ``cache_out.<i>``.

The wrapper modules take and return positional tensors only, so ``torch.export`` sees a plain
signature; names live in ``Stage.inputs`` / ``Stage.outputs``.

The contract is fp32 whatever the weights' dtype: a wrapper of an fp16 / bf16 module casts its
floating inputs to the module's dtype on entry and its floating outputs to fp32 on exit. ``t``
stays fp32 (the DiT builds its sinusoidal features from fp32 t; fp16 t would be off by ~1e-4,
i.e. ~0.1 rad at t * 1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .model_zoo.compute_dtype import compute_dtype
from .model_zoo.config import ModelConfig
from .model_zoo.pipeline import Pipeline
from .model_zoo.rope import rope_cos_sin

STAGE_NAMES = ("text_encoder", "dit_step", "decoder")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(t.shape), str(t.dtype).replace("torch.", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Stage:
    """A compilable graph: module, example inputs, named I/O, and which inputs are carried state."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # (input name, output name): the output that becomes that input on the next call / commit
    state_pairs: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def contract(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "state_pairs": [list(p) for p in self.state_pairs],
        }

    def run_float(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference outputs of the float module for named inputs."""
        with torch.no_grad():
            outs = self.module(*(inputs[n] for n in self.input_names))
        return dict(zip(self.output_names, outs))


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: fp32 for fp16/bf16 weights widened layer by layer on the host
    (``model_zoo.compute_dtype``), else its parameters' dtype (fp32 when it has none)."""
    return compute_dtype(module)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def _fp32(outs) -> tuple[torch.Tensor, ...]:
    return tuple(_cast(o, torch.float32) for o in outs)


class TextEncoderStage(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return _fp32((self.text_encoder(input_ids.long()),))


class DiTStepStage(nn.Module):
    """S2DiT.step with the cache dict flattened in a fixed key order."""

    def __init__(self, dit: nn.Module, cache_keys: list[str]):
        super().__init__()
        self.dit = dit
        self.cache_keys = list(cache_keys)
        self.entry_keys = [k for k in self.cache_keys if k != "window_valid"]

    def forward(self, x, t, context, hi_cos, hi_sin, lo_cos, lo_sin, *cache):
        dt = module_dtype(self.dit)
        x, context, hi_cos, hi_sin, lo_cos, lo_sin = (
            _cast(a, dt) for a in (x, context, hi_cos, hi_sin, lo_cos, lo_sin))
        cache = [_cast(c, dt) for c in cache]
        v, entries = self.dit.step(
            x, t, context, dict(zip(self.cache_keys, cache)), rope=(hi_cos, hi_sin, lo_cos, lo_sin)
        )
        return _fp32((v, *(entries[k] for k in self.entry_keys)))


class DecoderStage(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z, *cache):
        dt = module_dtype(self.decoder)
        video, new = self.decoder(_cast(z, dt), [_cast(c, dt) for c in cache])
        return _fp32((video, *new))


def rope_grids(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Token grids of a chunk: ``hi`` (full resolution) and ``lo`` (the SSA-strided grid)."""
    d = config.dit
    grid = d.token_grid(config.stream.chunk_frames, *config.latent_hw)
    return {"hi": grid, "lo": (grid[0], grid[1] // d.ssa_stride, grid[2] // d.ssa_stride)}


def rope_inputs(config: ModelConfig, frame_offset: int) -> dict[str, torch.Tensor]:
    """Host-side RoPE tables of a chunk at ``frame_offset`` (the ``dit_step`` rope inputs)."""
    d, grids = config.dit, rope_grids(config)
    hc, hs = rope_cos_sin(grids["hi"], d.head_dim, d.rope_theta, frame_offset)
    lc, ls = rope_cos_sin(grids["lo"], d.head_dim, d.rope_theta, frame_offset)
    return {"hi_cos": hc, "hi_sin": hs, "lo_cos": lc, "lo_sin": ls}


def dit_step_inputs(config: ModelConfig, x, t, context, cache, frame_offset: int) -> dict[str, torch.Tensor]:
    """Named ``dit_step`` inputs for a chunk, in the contract's order."""
    named = {"x": x, "t": torch.as_tensor(t, dtype=torch.float32).reshape(1), "context": context}
    named.update(rope_inputs(config, frame_offset))
    named.update({f"cache.{k}": v for k, v in cache.items()})
    return named


def build_stages(pipe: Pipeline, names: tuple[str, ...] = STAGE_NAMES) -> dict[str, Stage]:
    """Stages with example inputs taken from a real stream state (a filled cache window)."""
    unknown = sorted(set(names) - set(STAGE_NAMES))
    if unknown:
        raise KeyError(f"unknown stages {unknown}; stages are {', '.join(STAGE_NAMES)}")
    cfg = pipe.config
    stages: dict[str, Stage] = {}
    if "text_encoder" in names:
        ids = torch.zeros(1, cfg.text_encoder.max_position_embeddings, dtype=torch.int32)
        mod = TextEncoderStage(pipe.text_encoder).eval()
        with torch.no_grad():
            (ctx,) = mod(ids)
        stages["text_encoder"] = Stage("text_encoder", mod, (ids,), (TensorSpec.of("input_ids", ids),),
                                       (TensorSpec.of("context", ctx),))
    if "dit_step" in names:
        h, w = cfg.latent_hw
        cache = pipe.dit.init_cache(1, (h, w), cfg.stream)
        mod = DiTStepStage(pipe.dit, list(cache)).eval()
        ctx = torch.zeros(1, cfg.text_encoder.max_position_embeddings, cfg.dit.text_dim)
        named = dit_step_inputs(cfg, torch.zeros(1, *cfg.chunk_latent_shape), 1.0, ctx, cache, 0)
        with torch.no_grad():
            outs = mod(*named.values())
        out_names = ["velocity", *(f"entry.{k}" for k in mod.entry_keys)]
        stages["dit_step"] = Stage(
            "dit_step", mod, tuple(named.values()),
            tuple(TensorSpec.of(n, v) for n, v in named.items()),
            tuple(TensorSpec.of(n, o) for n, o in zip(out_names, outs)),
            tuple((f"cache.{k}", f"entry.{k}") for k in mod.entry_keys),
        )
    if "decoder" in names:
        h, w = cfg.latent_hw
        cache = pipe.decoder.init_cache(1, h, w)
        z = torch.zeros(1, *cfg.chunk_latent_shape)
        mod = DecoderStage(pipe.decoder).eval()
        with torch.no_grad():
            outs = mod(z, *cache)
        in_specs = (TensorSpec.of("z", z), *(TensorSpec.of(f"cache.{i}", c) for i, c in enumerate(cache)))
        out_names = ["video", *(f"cache_out.{i}" for i in range(len(cache)))]
        stages["decoder"] = Stage(
            "decoder", mod, (z, *cache), in_specs,
            tuple(TensorSpec.of(n, o) for n, o in zip(out_names, outs)),
            tuple((f"cache.{i}", f"cache_out.{i}") for i in range(len(cache))),
        )
    return stages
