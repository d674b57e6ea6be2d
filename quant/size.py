"""Model size accounting from parameter shapes: works on the meta device for paper-scale models."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .fake_quant import quantizable_layers
from .schemes import FLOAT_BITS, weight_scheme

# plan stage name -> Pipeline attribute holding its float module
STAGE_MODULES = {"text_encoder": "text_encoder", "dit_step": "dit", "decoder": "decoder"}


@dataclass(frozen=True)
class StageLayout:
    """Quantizable weight shapes of one stage plus the count of every other parameter (kept fp16)."""

    layers: Mapping[str, tuple[int, ...]]
    kinds: Mapping[str, str]
    other_params: int

    @classmethod
    def of(cls, module: nn.Module) -> StageLayout:
        layers = quantizable_layers(module)
        shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
        kinds = {n: type(m).__name__ for n, m in layers.items()}
        quant_ids = {id(m.weight) for m in layers.values()}
        seen: set[int] = set()
        other = 0
        for p in module.parameters():
            if id(p) in quant_ids or id(p) in seen:
                continue
            seen.add(id(p))
            other += p.numel()
        return cls(shapes, kinds, other)


def pipeline_layout(pipe) -> dict[str, StageLayout]:
    return {s: StageLayout.of(getattr(pipe, attr)) for s, attr in STAGE_MODULES.items()}


def config_layout(config) -> dict[str, StageLayout]:
    """Layouts of a model built on the meta device (no memory, any size)."""
    from s2dit_deploy.model_zoo.registry import build_stage

    out = {}
    with torch.device("meta"):
        for s, attr in (("text_encoder", "text_encoder"), ("dit_step", "dit"), ("decoder", "decoder")):
            out[s] = StageLayout.of(build_stage(config, attr))
    return out


def plan_size(plan, layouts: Mapping[str, StageLayout]) -> dict:
    """Bytes and average weight bits of a plan (layers the plan omits count as fp16)."""
    per_stage = {}
    total_bytes, total_w, total_wbits = 0.0, 0, 0.0
    for stage, lay in layouts.items():
        chosen = plan.stages.get(stage, {}) if plan is not None else {}
        b = lay.other_params * FLOAT_BITS / 8
        n_w, wbits = 0, 0.0
        for name, shape in lay.layers.items():
            lq = chosen.get(name)
            nb = weight_scheme(lq.weight if lq else "fp16").nbytes(shape)
            b += nb
            n_w += math.prod(shape)
            wbits += nb * 8
        per_stage[stage] = {"bytes": int(b), "weights": n_w, "avg_weight_bits": round(wbits / max(n_w, 1), 3)}
        total_bytes += b
        total_w += n_w
        total_wbits += wbits
    return {"bytes": int(total_bytes), "gb": round(total_bytes / 1e9, 4), "weights": total_w,
            "avg_weight_bits": round(total_wbits / max(total_w, 1), 3), "stages": per_stage}
