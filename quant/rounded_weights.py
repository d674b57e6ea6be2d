"""The rounded weights a plan carries (GPTQ): a hashed safetensors sidecar, and their installation.

A plan JSON names its sidecar by bare file name (it must sit next to the plan: no directories, no
``..``) with its SHA-256 and the layers it holds; loading checks all three, so a swapped, edited or
truncated sidecar is refused with its name. ``install`` puts the rounded values into the float
pipeline's modules before any target exports them (shape- and grid-checked), which is how every
target compiles exactly what the fake-quant evaluation scored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import RoundedWeightsError

log = logging.getLogger(__name__)

SUFFIX = ".weights.safetensors"
_BARE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_name(plan_path: str | os.PathLike) -> str:
    p = Path(plan_path)
    return (p.name[:-5] if p.name.endswith(".json") else p.name) + SUFFIX


def save_sidecar(rounded: Mapping[str, Mapping[str, torch.Tensor]], plan_path: str | os.PathLike) -> dict[str, Any]:
    """Write ``<plan stem>.weights.safetensors`` atomically next to the plan; return its JSON record."""
    from safetensors.torch import save_file

    plan_path = Path(plan_path)
    name = sidecar_name(plan_path)
    tensors = {f"{s}/{n}": t.detach().contiguous().cpu() for s, layers in rounded.items() for n, t in layers.items()}
    tmp = plan_path.parent / (name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(plan_path.parent / name)
    return {"file": name, "sha256": _sha256(plan_path.parent / name),
            "layers": {s: sorted(layers) for s, layers in rounded.items() if layers}}


def load_sidecar(record: Mapping[str, Any], folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The rounded weights a plan's ``rounded_weights`` record names, verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(record, Mapping) or not {"file", "sha256", "layers"} <= set(record):
        raise RoundedWeightsError("plan field 'rounded_weights' needs 'file', 'sha256' and 'layers'")
    name = record["file"]
    if not isinstance(name, str) or not _BARE.match(name) or ".." in name:
        raise RoundedWeightsError(f"plan field 'rounded_weights.file' must be a bare file name next to the plan, "
                                  f"not {name!r}")
    path = folder / name
    if not path.is_file():
        raise RoundedWeightsError(f"the plan's rounded weights {path} do not exist (they travel with the plan JSON)")
    digest = _sha256(path)
    if digest != record["sha256"]:
        raise RoundedWeightsError(f"{path}: SHA-256 {digest[:12]}... differs from the plan's "
                                  f"{str(record['sha256'])[:12]}...; the sidecar was altered or belongs to another plan")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise RoundedWeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    want = {f"{s}/{n}" for s, names in record["layers"].items() for n in names}
    if set(tensors) != want:
        raise RoundedWeightsError(f"{path}: holds {len(tensors)} tensors, the plan lists {len(want)} "
                                  f"(e.g. {sorted(set(tensors) ^ want)[:3]})")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise RoundedWeightsError(f"{path}: tensor {key!r} has NaN/inf")
        stage, layer = key.split("/", 1)
        out.setdefault(stage, {})[layer] = t
    return out


def install(pipe, plan) -> list[str]:
    """Put ``plan.rounded`` into ``pipe``'s float modules (in place); returns the layers replaced."""
    from .gptq import on_grid
    from .size import STAGE_MODULES

    done = []
    for stage, layers in plan.rounded.items():
        module = getattr(pipe, STAGE_MODULES[stage])
        mods = dict(module.named_modules())
        for name, w in layers.items():
            lq = plan.stages.get(stage, {}).get(name)
            if name not in mods or not hasattr(mods[name], "weight"):
                raise RoundedWeightsError(f"rounded weight {stage}:{name}: the model has no such layer")
            target = mods[name].weight
            if tuple(w.shape) != tuple(target.shape):
                raise RoundedWeightsError(f"rounded weight {stage}:{name} has shape {tuple(w.shape)}, the model's "
                                          f"layer {tuple(target.shape)}: the plan was made for another model")
            if lq is None or not on_grid(w, lq.weight):
                raise RoundedWeightsError(f"rounded weight {stage}:{name} is not on the grid of its planned scheme "
                                          f"{getattr(lq, 'weight', None)!r}")
            with torch.no_grad():
                target.copy_(w.to(target.dtype))
            done.append(f"{stage}:{name}")
    if done:
        log.info("installed %d GPTQ-rounded weights from plan %r", len(done), plan.name)
    return done
