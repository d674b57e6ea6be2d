"""QuantPlan: which scheme every layer of every stage gets, as data (JSON), plus the presets.

A plan maps stage -> layer -> ``LayerQuant`` (weight scheme, activation scheme and its calibrated
range). Layer names are relative to the stage's float module (``pipe.dit`` for ``dit_step``,
``pipe.text_encoder``, ``pipe.decoder``). Provenance records the model hash, the calibration set
hash, the metric and how the plan was chosen, so a plan can be traced back to its evidence.

Presets (the DiT gets the preset; the text encoder is kept at int8 weights with the preset's
activations, the decoder at int8 weights and float activations since it runs on the GPU):
- ``w8a8``: int8 per-channel weights, int8 activations.
- ``w4a8-uniform``: int4 weights everywhere, int8 activations.
- ``w4a8-seed``: the seed's fixed recipe (supplement D.2: patch embed, head, text and time
  embeddings in int8, the rest int4), int8 activations.
- ``w4a8-mixed``: always the sensitivity-allocated plan at the size of ``w4a8-uniform``: GPTQ and
  round-to-nearest int4/int8 and LUTs chosen per layer by measured sensitivity and a decoded-stream
  check (``workflow.calibrate``; cached by model hash, target and resolution). It is never a fixed
  recipe, so ``preset_plan`` refuses it.
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
PRESETS = ("w8a8", "w4a8-uniform", "w4a8-seed", "w4a8-mixed", "w4a16")
MIXED = "w4a8-mixed"  # the one preset that needs sensitivity data
FIXED_PRESETS = tuple(p for p in PRESETS if p != MIXED)
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
    """``rounded`` holds the GPTQ-rounded weights of ``-gptq`` layers (stage -> layer -> tensor);
    they are saved next to the plan JSON as ``<plan>.weights.safetensors``, hashed in the JSON.
    ``origin`` is the folder the plan was loaded from (never serialized: plans hold no absolute
    paths); its calibration report is ``origin / provenance["report"]``."""

    name: str
    model: str
    stages: Mapping[str, Mapping[str, LayerQuant]]
    target: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    rounded: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False, repr=False)
    origin: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        missing = [f"{s}:{n}" for s, layers in self.stages.items() for n, lq in layers.items()
                   if weight_scheme(lq.weight).rounding == "gptq" and n not in self.rounded.get(s, {})]
        if missing:
            raise ValueError(f"plan {self.name!r}: -gptq layers without rounded weights: {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")

    def with_provenance(self, **extra: Any) -> QuantPlan:
        return QuantPlan(self.name, self.model, self.stages, self.target, {**self.provenance, **extra}, self.rounded,
                         self.origin)

    def report_dir(self) -> Path | None:
        """The calibration report folder of this plan, if it was loaded from next to one."""
        rel = self.provenance.get("report")
        if self.origin is None or not isinstance(rel, str) or not rel or "/" in rel or ".." in rel:
            return None
        return self.origin / rel

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

    def to_dict(self, weights_file: Mapping[str, Any] | None = None) -> dict[str, Any]:
        d = {"format": FORMAT, "name": self.name, "model": self.model, "target": self.target,
             "provenance": dict(self.provenance),
             "stages": {s: {n: lq.to_dict() for n, lq in layers.items()} for s, layers in self.stages.items()}}
        if weights_file is not None:
            d["rounded_weights"] = dict(weights_file)
        return d

    def to_json(self, weights_file: Mapping[str, Any] | None = None) -> str:
        return json.dumps(self.to_dict(weights_file), indent=1, sort_keys=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan JSON (and, with rounded weights, its safetensors sidecar) atomically."""
        from .rounded_weights import save_sidecar

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = save_sidecar(self.rounded, path) if any(self.rounded.values()) else None
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json(record))
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], folder: str | os.PathLike | None = None) -> QuantPlan:
        """A plan from its JSON; ``folder`` is where a ``rounded_weights`` sidecar is looked up."""
        if d.get("format") != FORMAT:
            raise ValueError(f"not a quantization plan (format {d.get('format')!r}, expected {FORMAT!r})")
        stages = {s: {n: LayerQuant(v["weight"], v.get("act", "float"),
                                    tuple(v["act_range"]) if v.get("act_range") is not None else None)
                      for n, v in layers.items()} for s, layers in d["stages"].items()}
        rounded: dict[str, dict[str, Any]] = {}
        if d.get("rounded_weights") is not None:
            from .rounded_weights import load_sidecar

            if folder is None:
                raise ValueError(f"plan {d.get('name')!r} has rounded weights; load it from its file "
                                 "(QuantPlan.load) so the sidecar can be found")
            rounded = load_sidecar(d["rounded_weights"], Path(folder))
        return cls(d["name"], d["model"], stages, d.get("target"), d.get("provenance", {}), rounded,
                   Path(folder) if folder is not None else None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"quantization plan {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(d, path.parent)


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
    if preset == MIXED:
        raise ValueError(f"{MIXED!r} is allocated from measured sensitivity, not a fixed recipe: build it with "
                         "s2dit_deploy.calibrate(...) (CLI: s2dit-deploy calibrate); the seed's fixed recipe "
                         "is 'w4a8-seed'")
    if preset not in PRESETS:
        raise KeyError(f"unknown quantization preset {preset!r}; presets: {', '.join(PRESETS)}")
    a = "int16" if preset == "w4a16" else "int8"
    if stage == "text_encoder":
        return "int8-pc", a
    if stage == "decoder":
        return "int8-pc", "float"
    if preset == "w8a8" or (preset == "w4a8-seed" and SEED_SENSITIVE.match(name)):
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
