"""Turn what a user passed as ``--quant`` into a plan that fits the model being compiled.

Separate from ``plan.py`` (plans as data) because resolving ``w4a8-mixed`` runs the calibration
workflow, which itself builds plans: keeping this on top keeps quant/'s import graph acyclic.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import PlanMismatchError
from .plan import MIXED, PRESETS, QuantPlan, preset_plan

log = logging.getLogger(__name__)


def resolve_plan(quant: Any, pipe, target: str | None, recalibrate: bool = False) -> QuantPlan:
    """A QuantPlan, a plan.json path or a preset name -> a plan legal on ``target`` for ``pipe``.

    A fixed preset calibrates activation ranges on the default calibration prompts (cached on disk
    by model hash); ``w4a8-mixed`` runs (or reuses from the same cache) the whole sensitivity
    workflow, exactly as ``s2dit-deploy calibrate`` does with its defaults. A plan made for other
    weights, another model or another resolution is refused (``PlanMismatchError``); with
    ``recalibrate`` the plan's preset is rebuilt for this model instead.
    """
    if isinstance(quant, QuantPlan):
        plan = quant
    elif isinstance(quant, (str, os.PathLike)) and (str(quant).endswith(".json") or Path(quant).is_file()):
        plan = QuantPlan.load(quant)
    elif isinstance(quant, str):
        if quant not in PRESETS:
            raise KeyError(f"--quant {quant!r} is neither a preset ({', '.join(PRESETS)}) nor a plan .json file")
        plan = _preset_for(quant, pipe, target)
    else:
        raise TypeError(f"quant must be a preset name, a plan path or a QuantPlan, not {type(quant).__name__}")
    problems = plan_mismatch(plan, pipe)
    if problems:
        preset = plan.provenance.get("preset") or plan.name
        if not recalibrate or preset not in PRESETS:
            raise PlanMismatchError(f"plan {plan.name!r} does not fit this model: {'; '.join(problems)}"
                                    + ("" if recalibrate else f"; re-run calibration, or pass the explicit "
                                       f"recalibrate flag (--recalibrate) to rebuild preset {preset!r} for it"))
        log.warning("plan %r: %s; recalibrating preset %s as asked", plan.name, "; ".join(problems), preset)
        plan = _preset_for(preset, pipe, target)
    plan.check_target(target)
    return plan


def plan_mismatch(plan: QuantPlan, pipe) -> list[str]:
    """What differs between the model a plan was calibrated on and ``pipe`` (empty: it fits)."""
    from .capture import model_hash

    prov = plan.provenance
    out = []
    if plan.model != pipe.config.name:
        out.append(f"made for model {plan.model!r}, not {pipe.config.name!r}")
    if prov.get("model_hash") and prov["model_hash"] != model_hash(pipe):
        out.append(f"calibrated on weights {prov['model_hash']}, these are {model_hash(pipe)}")
    res = f"{pipe.config.height}x{pipe.config.width}"
    if prov.get("resolution") and prov["resolution"] != res:
        out.append(f"calibrated at resolution {prov['resolution']}, compiling at {res}")
    return out


def _preset_for(preset: str, pipe, target: str | None) -> QuantPlan:
    if preset == MIXED:
        from .workflow import mixed_plan_for  # noqa: I001 (lazy: the workflow is heavy)

        return mixed_plan_for(pipe, target)
    from .capture import default_calibration
    from .size import pipeline_layout

    calib = default_calibration(pipe)
    return preset_plan(preset, pipeline_layout(pipe), pipe.config.name, target, calib.stats,
                       provenance={**calib.provenance(), "resolution": f"{pipe.config.height}x{pipe.config.width}"})
