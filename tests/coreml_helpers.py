"""Shared, per-process cached Core ML conversions of s2dit-tiny stages for the Core ML tests."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import pytest
import torch
from s2dit_deploy.model_zoo.pipeline import Pipeline
from s2dit_deploy.model_zoo.registry import get_card, load_stage

from s2dit_deploy.stages import build_stages

coremltools = pytest.importorskip("coremltools")

_ROOT = Path(tempfile.mkdtemp(prefix="s2dit-coreml-tests-"))


def tiny_pipeline(blocks_per_group: int = 1) -> Pipeline:
    """s2dit-tiny; one block per group keeps conversion tests fast (every block kind still present)."""
    cfg = get_card("s2dit-tiny").config
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, blocks_per_group=blocks_per_group))
    return Pipeline(cfg, *(load_stage(cfg, None, s) for s in ("text_encoder", "dit", "decoder")))


@functools.cache
def stages():
    return build_stages(tiny_pipeline())


@functools.cache
def compiled(stage_name: str, options: tuple = ()):
    """(stage, artifact, out_dir, mlmodel spec path) for a tiny stage compiled by the coreml target."""
    from s2dit_deploy.targets.coreml.target import TARGET

    stage = stages()[stage_name]
    out = _ROOT / f"{stage_name}-{abs(hash(options))}"
    out.mkdir(parents=True, exist_ok=True)
    art = TARGET.compile(stage, None, out, dict(options))
    return stage, art, out


def random_inputs(stage, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    named = {}
    for spec, ex in zip(stage.inputs, stage.example_inputs):
        if not ex.is_floating_point():
            named[spec.name] = torch.randint(0, 1000, tuple(spec.shape), generator=g, dtype=ex.dtype)
        elif spec.name == "cache.window_valid":
            named[spec.name] = torch.tensor([0.0, 1.0])
        elif spec.name == "t":
            named[spec.name] = torch.tensor([0.63])
        elif spec.name in ("hi_cos", "hi_sin", "lo_cos", "lo_sin"):
            named[spec.name] = ex
        elif spec.name.endswith("ksum"):
            named[spec.name] = torch.rand(tuple(spec.shape), generator=g) * 10
        else:
            named[spec.name] = torch.randn(tuple(spec.shape), generator=g)
    return named
