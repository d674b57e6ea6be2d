"""The search's cost oracle: predicted DiT-step cost of sandwich layouts, from traced op lists.

Each layout the search needs priced (all-L and every single S run, see
``reference_training.search.layouts``) is traced on the meta device through the deployed
``dit_step`` stage and priced by the per-op device cost model (``cost_model.estimate_ops``,
milliseconds on a device profile at a precision) or by its FLOPs (GFLOP per step, the fallback
when no device is named). The search side receives plain numbers, so the training code never
imports the bench layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from s2dit_deploy.model_zoo.config import ModelConfig
from s2dit_deploy.targets.devices import get_device

from .cost_model import estimate_ops, family_params
from .stage_ops import stage_ops


def layout_config(config: ModelConfig, layout: str) -> ModelConfig:
    return dataclasses.replace(config, dit=dataclasses.replace(config.dit, layout=layout, search=False))


def layout_pricer(config: ModelConfig, device: str | None, precision: str = "fp16"
                  ) -> tuple[Callable[[str], float], str, str]:
    """(price(layout), unit, source label) for one DiT step at the config's resolution."""
    if device is None:
        def price(layout: str) -> float:
            return sum(o.flops for o in stage_ops(layout_config(config, layout), "dit_step")) / 1e9
        return price, "gflop", f"FLOPs of one dit_step at {config.height}x{config.width}"
    dev = get_device(device)
    params, info = family_params(dev.family)

    def price(layout: str) -> float:
        ops = stage_ops(layout_config(config, layout), "dit_step")
        return estimate_ops(ops, dev, precision, "dit_step", params).seconds * 1e3

    label = (f"cost model {'fitted' if info.get('fitted') else 'unfitted'} estimate, {dev.id} {precision}, "
             f"{config.height}x{config.width} (an estimate, not a measurement)")
    return price, "ms", label
