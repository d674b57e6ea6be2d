"""QuantPlan -> ExecuTorch XNNPACK: torchao ``quantize_`` per layer, as the plan says.

XNNPACK runs two weight forms the plan can name: ``int8-pc`` (int8 per output channel) and
``int4-b32`` (int4, group 32: torchao 8da4w), both with dynamic per-token int8 activations
(``int8-dyn``: what ``Int8DynamicActivationIntxWeightConfig`` emits and XNNPACK lowers). Each
Linear gets its own config through ``quantize_``'s ``filter_fn``; layers the plan leaves at fp16
(and every non-Linear layer) stay float. Static int8 activation ranges are not used here: the
preset legalizer gives XNNPACK plans ``int8-dyn`` activations, so fake quantization simulates
exactly what the artifact runs.

Contract (``targets/xnnpack/quantize.py``): ``apply_plan(plan, stage_name, module, example_inputs,
calibration_batches) -> (module ready for torch.export, summary dict)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layer_names import match_layer
from .schemes import weight_scheme

log = logging.getLogger(__name__)


def layer_map(module: nn.Module, plan_layers: Sequence[str]) -> dict[str, str]:
    """Module fqn (of the compiled stage module) -> plan layer name, for Linear / Conv modules."""
    out = {}
    for fqn, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and fqn:
            layer = match_layer(fqn, list(plan_layers))
            if layer is not None:
                out[fqn] = layer
    return out


def apply_plan(plan, stage_name: str, module: nn.Module, example_inputs: tuple = (),
               calibration_batches: Sequence[tuple] = ()) -> tuple[nn.Module, dict[str, Any]]:
    from .torchao_compat import import_torchao

    import_torchao()  # quiet the CUDA-only kernel warnings
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        PerAxis,
        PerGroup,
        quantize_,
    )

    plan.check_target("executorch-xnnpack")
    layers = plan.stages.get(stage_name, {})
    fqn_to_layer = layer_map(module, list(layers))
    mods = dict(module.named_modules())
    chosen: dict[str, list[str]] = {"int8-pc": [], "int4-b32": []}
    skipped: list[str] = []
    for fqn, layer in fqn_to_layer.items():
        w = layers[layer].weight
        if w == "fp16":
            continue
        if not isinstance(mods[fqn], nn.Linear):
            skipped.append(f"{fqn} ({type(mods[fqn]).__name__}, {w})")
            continue
        ws = weight_scheme(w)
        if ws.granularity == "block" and mods[fqn].in_features % ws.block:
            skipped.append(f"{fqn} (in_features {mods[fqn].in_features} not a multiple of {ws.block})")
            continue
        chosen["int4-b32" if ws.granularity == "block" else "int8-pc"].append(fqn)
    configs = {
        "int8-pc": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
        "int4-b32": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
    }
    for scheme, fqns in chosen.items():
        if fqns:
            wanted = set(fqns)
            quantize_(module, configs[scheme], filter_fn=lambda m, fqn, wanted=wanted: fqn in wanted)
    if skipped:
        log.warning("xnnpack %s: %d plan layers stay float (%s)", stage_name, len(skipped), skipped[:3])
    summary = {"plan": plan.name, "stage": stage_name, "flow": "torchao quantize_ per layer",
               "activations": "int8 dynamic per token", "counts": {k: len(v) for k, v in chosen.items()},
               "float_layers": skipped, "unmatched_layers": sorted(set(layers) - set(fqn_to_layer.values()))}
    return module, summary
