"""QuantPlan: which scheme every layer of every stage gets, as data (JSON), plus the presets.

A plan maps stage -> layer -> ``LayerQuant`` (weight scheme, activation scheme and its calibrated
range). Layer names are relative to the stage's float module (``pipe.dit`` for ``dit_step``,
``pipe.text_encoder``, ``pipe.decoder``). Provenance records the model hash, the calibration set
hash, the metric and how the plan was chosen, so a plan can be traced back to its evidence.

Presets (the DiT gets the preset; the text encoder is kept at int8 weights with the preset's
activations, the decoder at int8 weights and float activations since it runs on the GPU):
- ``w8a8``: int8 per-channel weights, int8 activations.
- ``w4a8-uniform``: int4 weights everywhere, int8 activations.
- ``w4a8-mixed``: the seed recipe (patch embed, head, text and time embeddings in int8, the rest
  int4) as the starting point; ``s2dit-deploy calibrate`` then reallocates by measured
  sensitivity under a size budget (see ``allocate.py``).
- ``w4a16``: int4 weights, 16-bit activations (fp16 where a target has no int16).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .schemes import act_scheme, fits, target_schemes, weight_scheme

log = logging.getLogger(__name__)

FORMAT = "s2dit-quant-plan/1"
PRESETS = ("w8a8", "w4a8-uniform", "w4a8-mixed", "w4a16")
# The seed's sensitive layers (supplement D.2: project in/out, text embedding) plus the timestep
# embedding, whose output modulates every block.
SEED_SENSITIVE = re.compile(r"^(patch_embed|head|text_embedding\..*|time_embedding\..*)$")


@dataclass(frozen=True)
class LayerQuant:
    weight: str = "fp16"
    act: str = "float"
    act_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        weight_scheme(self.weight)
        a = act_scheme(self.act)
        if self.act_range is not None:
            object.__setattr__(self, "act_range", (float(self.act_range[0]), float(self.act_range[1])))
        elif not a.is_float and not a.dynamic:
            pass  # embeddings take no activation range; a missing range is caught when applied

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["act_range"] = list(self.act_range) if self.act_range is not None else None
        return d


@dataclass(frozen=True)
class QuantPlan:
    name: str
    model: str
    stages: Mapping[str, Mapping[str, LayerQuant]]
    target: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def layer(self, stage: str, name: str) -> LayerQuant | None:
        return self.stages.get(stage, {}).get(name)

    def check_target(self, target: str | None) -> None:
        """Raise if any layer uses a scheme the target cannot run."""
        ts = target_schemes(target)
        bad = [f"{s}:{n} ({lq.weight}/{lq.act})" for s, layers in self.stages.items() for n, lq in layers.items()
               if not ts.legal_weight(lq.weight) or not ts.legal_act(lq.act)]
        if bad:
            raise ValueError(f"plan {self.name!r} uses schemes that {ts.target} cannot run ({ts.note}): "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s, layers in self.stages.items():
            for lq in layers.values():
                key = f"{lq.weight}/{lq.act}"
                out.setdefault(s, {})[key] = out.setdefault(s, {}).get(key, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "model": self.model, "target": self.target,
                "provenance": dict(self.provenance),
                "stages": {s: {n: lq.to_dict() for n, lq in layers.items()} for s, layers in self.stages.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantPlan:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a quantization plan (format {d.get('format')!r}, expected {FORMAT!r})")
        stages = {s: {n: LayerQuant(v["weight"], v.get("act", "float"),
                                    tuple(v["act_range"]) if v.get("act_range") is not None else None)
                      for n, v in layers.items()} for s, layers in d["stages"].items()}
        return cls(d["name"], d["model"], stages, d.get("target"), d.get("provenance", {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quantization plan {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(d)


# ---- presets ------------------------------------------------------------------------------------

def legalize(weight: str, act: str, target: str | None) -> tuple[str, str]:
    """Nearest scheme pair the target can run (int4 -> 8da4w on XNNPACK, int16 -> fp16 on Core ML...)."""
    ts = target_schemes(target)
    w, a = weight, act
    if not ts.legal_weight(w):
        base = weight_scheme(w)
        if base.kind == "linear" and base.bits == 4 and ts.legal_weight("int4-b32"):
            w = "int4-b32"
        elif base.kind == "linear" and base.bits == 4 and ts.legal_weight("int4-pc"):
            w = "int4-pc"
        elif ts.legal_weight("int8-pc"):
            w = "int8-pc"
        else:
            raise ValueError(f"{ts.target} has no legal replacement for weight scheme {weight!r}")
    if w == "int4-b32" and a == "int8" and ts.legal_act("int8-dyn"):
        a = "int8-dyn"  # 8da4w quantizes activations dynamically per token
    if not ts.legal_act(a):
        if a == "int16" and ts.legal_act("float"):
            a = "float"
        elif ts.legal_act("int8"):
            a = "int8"
        else:
            raise ValueError(f"{ts.target} has no legal replacement for activation scheme {act!r}")
    return w, a


def preset_schemes(preset: str, stage: str, name: str, kind: str = "") -> tuple[str, str]:
    """(weight scheme, activation scheme) a preset gives one layer of a stage (before legalizing)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown quantization preset {preset!r}; presets: {', '.join(PRESETS)}")
    a = "int16" if preset == "w4a16" else "int8"
    if stage == "text_encoder":
        return "int8-pc", a
    if stage == "decoder":
        return "int8-pc", "float"
    if preset == "w8a8" or (preset == "w4a8-mixed" and SEED_SENSITIVE.match(name)):
        return "int8-pc", a
    return "int4-pc", a


def preset_plan(preset: str, layouts: Mapping[str, Any], model: str, target: str | None = None,
                stats: Mapping[str, Mapping[str, Any]] | None = None, range_method: str = "mse",
                provenance: Mapping[str, Any] | None = None) -> QuantPlan:
    """A preset over ``layouts`` (stage -> StageLayout); ranges from ``stats`` (stage -> layer -> ActStats)."""
    stages: dict[str, dict[str, LayerQuant]] = {}
    for stage, lay in layouts.items():
        layers = {}
        for name in lay.layers:
            kind = lay.kinds.get(name, "")
            w, a = legalize(*preset_schemes(preset, stage, name, kind), target)
            if not fits(w, tuple(lay.layers[name])):  # per-block int4 needs whole blocks per row
                w = "int8-pc" if target_schemes(target).legal_weight("int8-pc") else w
            if target == "executorch-xnnpack":  # torchao per-layer flow: Linear only, dynamic int8 acts
                w, a = (w, "int8-dyn") if kind == "Linear" and w != "fp16" else ("fp16", "float")
            rng = None
            if kind == "Embedding":
                a = "float" if target_schemes(target).legal_act("float") else a
            elif not act_scheme(a).is_float and not act_scheme(a).dynamic:
                st = (stats or {}).get(stage, {}).get(name)
                if st is None:
                    raise ValueError(f"preset {preset!r} needs calibrated activation ranges for {stage}:{name}; "
                                     "run calibration first (quant.capture.calibrate)")
                rng = st.range(range_method) if hasattr(st, "range") else tuple(st)
            layers[name] = LayerQuant(w, a, rng)
        stages[stage] = layers
    prov = {"method": "preset", "preset": preset, "range_method": range_method, **(provenance or {})}
    return QuantPlan(preset, model, stages, target, prov)


def resolve_plan(quant: Any, pipe, target: str | None) -> QuantPlan:
    """A QuantPlan, a plan.json path or a preset name -> a plan legal on ``target``.

    A preset calibrates activation ranges on the default calibration prompts (cached on disk by
    model hash); ``s2dit-deploy calibrate`` gives a sensitivity-driven plan instead.
    """
    if isinstance(quant, QuantPlan):
        plan = quant
    elif isinstance(quant, (str, os.PathLike)) and (str(quant).endswith(".json") or Path(quant).is_file()):
        plan = QuantPlan.load(quant)
    elif isinstance(quant, str):
        if quant not in PRESETS:
            raise KeyError(f"--quant {quant!r} is neither a preset ({', '.join(PRESETS)}) nor a plan .json file")
        from .capture import default_calibration
        from .size import pipeline_layout

        calib = default_calibration(pipe)
        plan = preset_plan(quant, pipeline_layout(pipe), pipe.config.name, target, calib.stats,
                           provenance=calib.provenance())
        if quant == "w4a8-mixed":
            log.warning("preset w4a8-mixed without sensitivity data uses the seed recipe; "
                        "`s2dit-deploy calibrate --preset w4a8-mixed` writes a sensitivity-driven plan")
    else:
        raise TypeError(f"quant must be a preset name, a plan path or a QuantPlan, not {type(quant).__name__}")
    if plan.model != pipe.config.name:
        log.warning("plan %r was made for %s, applying it to %s", plan.name, plan.model, pipe.config.name)
    plan.check_target(target)
    return plan
