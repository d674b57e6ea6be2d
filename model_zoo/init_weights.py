"""Seeded initial weights of a model config, written straight to a checkpoint folder.

Why: no trained paper-scale weights exist, yet every compile / validate / bench figure must come
through a checkpoint folder exactly like a user's. ``s2dit-mobile``'s DiT is 1.83B parameters
(7.3 GB in fp32), so the stage is built on the meta device and materialised one *unit* (a
subtree of at most ``UNIT_BYTES`` of fp32 parameters, e.g. one DiT block) at a time; each tensor
is cast to the checkpoint dtype and streamed into the safetensors file (``write_safetensors``),
so peak memory is one unit, not the model.

Init semantics reproduce what each module's own constructor does (checked parameter by
parameter against a real build in tests/test_init_checkpoint.py):

* ``nn.Linear`` / ``nn.Conv*d`` / ``nn.LayerNorm`` / ``nn.Embedding``: their own
  ``reset_parameters()`` (kaiming-uniform weights and fan-in uniform biases; LayerNorm weight 1,
  bias 0; Embedding N(0, 1)), the defaults every module here is built with.
* ``Downsampler`` / ``Upsampler`` (sandwich samplers): the constructor's average-pooling and
  nearest-upsampling weights, zero biases.
* ``DiTBlock.modulation`` and ``S2DiT.head_modulation``: N(0, 1) / sqrt(dim), as in ``__init__``.
* ``SandwichRouters.logits``: zeros. ``FrameGroupNorm``: weight 1, bias 0.
* The CLIP text encoder: Hugging Face's own ``_init_weights`` of the model, applied children
  first as ``PreTrainedModel.initialize_weights`` does (N(0, 0.02) embeddings, scaled normal q/k/v/o
  and MLP weights, zero biases, LayerNorm 1 / 0).

A parameter no rule covers is an error, never silent garbage. Each unit draws from its own
generator state, seeded from (seed, stage, unit path): the same seed gives identical tensors in
any order, another seed different ones.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (CONFIG_FILE, STAGE_FILES, atomic_folder, config_text, sha256_file,
                         write_safetensors)
from .config import ModelConfig
from .registry import build_stage

log = logging.getLogger(__name__)

STAGES = ("dit", "text_encoder", "decoder")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNIT_BYTES = 512 << 20  # fp32 bytes of one materialised unit: one paper-scale DiT block is ~250 MB
_TORCH_RESET = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding, nn.GroupNorm)


@dataclass(frozen=True)
class Unit:
    """A subtree materialised at once: ``path`` ('' for the stage root), its module, and whether it
    holds only the module's own (non-recursive) parameters."""

    path: str
    module: nn.Module
    direct_only: bool

    def names(self) -> list[str]:
        pre = f"{self.path}." if self.path else ""
        if self.direct_only:
            return [pre + n for n, _ in self.module.named_parameters(recurse=False)]
        return [pre + n for n in self.module.state_dict()]


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def plan_units(module: nn.Module, path: str = "", limit: int = UNIT_BYTES,
               atomic: frozenset[str] = frozenset()) -> list[Unit]:
    """Split ``module`` into subtrees of at most ``limit`` fp32 bytes. A leaf, or a module whose
    class is in ``atomic`` (its init rule sets its children's parameters), is never split."""
    children = list(module.named_children())
    if _param_bytes(module) <= limit or not children or type(module).__name__ in atomic:
        return [Unit(path, module, False)]
    units = []
    if any(True for _ in module.parameters(recurse=False)):
        units.append(Unit(path, module, True))
    for name, child in children:
        units.extend(plan_units(child, f"{path}.{name}" if path else name, limit, atomic))
    return units


# modules whose own init sets their children's parameters (``_s2dit_rules``); Hugging Face names
# its unsplittable modules itself (``_no_split_modules``: CLIP's embeddings and encoder layers)
S2DIT_ATOMIC = frozenset({"Downsampler", "Upsampler"})


def unit_seed(seed: int, stage: str, path: str) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- init rules (our modules)

def _s2dit_rules() -> dict[type, Callable[[nn.Module], set[str]]]:
    """Rules for the project's own modules; each returns the local parameter names it set."""
    from .blocks import DiTBlock
    from .decoder import FrameGroupNorm
    from .dit import S2DiT
    from .sandwich import Downsampler, SandwichRouters, Upsampler

    def modulation(attr: str):
        def rule(m: nn.Module) -> set[str]:
            p = getattr(m, attr)
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
            return {attr}
        return rule

    def downsampler(m: nn.Module) -> set[str]:
        w, s = m.conv.weight, m.conv.stride[0]
        w.zero_()
        idx = torch.arange(w.shape[0])
        w[idx, idx] = 1.0 / s**2
        m.conv.bias.zero_()
        return {"conv.weight", "conv.bias"}

    def upsampler(m: nn.Module) -> set[str]:
        dim, s = m.proj.weight.shape[1], m.stride
        m.proj.weight.copy_(torch.eye(dim).repeat_interleave(s * s, dim=0))
        m.proj.bias.zero_()
        return {"proj.weight", "proj.bias"}

    def group_norm(m: nn.Module) -> set[str]:
        m.weight.fill_(1.0)
        m.bias.zero_()
        return {"weight", "bias"}

    def routers(m: nn.Module) -> set[str]:
        m.logits.zero_()
        return {"logits"}

    return {DiTBlock: modulation("modulation"), S2DiT: modulation("head_modulation"),
            Downsampler: downsampler, Upsampler: upsampler, FrameGroupNorm: group_norm,
            SandwichRouters: routers}


def _init_torch_unit(unit: nn.Module, direct_only: bool) -> None:
    """Post-order over the unit: torch layers reset themselves, then our modules' rules override."""
    rules = _s2dit_rules()
    covered: set[int] = set()
    mods = [("", unit)] if direct_only else list(unit.named_modules())
    for _, mod in reversed(mods):  # named_modules is pre-order; reversed visits children first
        rule = rules.get(type(mod))
        if rule is not None:
            covered.update(id(mod.get_parameter(n)) for n in rule(mod))
        elif isinstance(mod, _TORCH_RESET) and not direct_only:
            mod.reset_parameters()
            covered.update(id(p) for p in mod.parameters(recurse=False))
    params = unit.named_parameters(recurse=not direct_only)
    missing = [n for n, p in params if id(p) not in covered]
    if missing:
        raise RuntimeError(f"no init rule for parameters {missing[:5]} of {type(unit).__name__}; "
                           "add one to model_zoo/init_weights.py")


def _init_hf_unit(hf_model: nn.Module, unit: nn.Module) -> None:
    """Hugging Face's own per-module init, children first (as ``initialize_weights`` runs it)."""
    for mod in reversed(list(unit.modules())):
        hf_model._init_weights(mod)


def _materialise(unit: Unit) -> nn.Module:
    """A real (CPU, fp32) copy of the unit's meta subtree, values still undefined."""
    if unit.direct_only:
        shell = copy.copy(unit.module)  # same class, no children: only its own parameters
        shell._modules = {}
        shell._parameters = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                             for n, p in unit.module._parameters.items() if p is not None}
        shell._buffers = {}
        return shell
    return copy.deepcopy(unit.module).to_empty(device="cpu")


Header = list[tuple[str, torch.Size, torch.dtype]]


def stage_tensors(config: ModelConfig, stage: str, seed: int, dtype: torch.dtype, unit_bytes: int = UNIT_BYTES
                  ) -> tuple[Header, Callable[[], Iterator[tuple[str, torch.Tensor]]]]:
    """The stage's (name, shape, dtype) header and a generator of its seeded tensors, in that order."""
    with torch.device("meta"):
        meta = build_stage(config, stage)
    hf_model = getattr(meta, "model", None) if stage == "text_encoder" else None
    atomic = frozenset(getattr(hf_model, "_no_split_modules", None) or ()) if hf_model is not None else S2DIT_ATOMIC
    units = plan_units(meta, limit=unit_bytes, atomic=atomic)
    state = meta.state_dict()
    names = [n for u in units for n in u.names()]
    if sorted(names) != sorted(state) or len(set(names)) != len(names):
        extra = sorted(set(state) - set(names))
        raise RuntimeError(f"{stage}: units do not cover the state dict exactly (e.g. {extra[:3]}): persistent "
                           "buffers need an init rule in model_zoo/init_weights.py")
    header = [(n, state[n].shape, dtype if state[n].is_floating_point() else state[n].dtype) for n in names]

    def generate() -> Iterator[tuple[str, torch.Tensor]]:
        for unit in units:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(unit_seed(seed, stage, unit.path))
                real = _materialise(unit)
                if hf_model is not None:
                    _init_hf_unit(hf_model, real)
                else:
                    _init_torch_unit(real, unit.direct_only)
            own = real.named_parameters(recurse=False) if unit.direct_only else real.state_dict().items()
            pre = f"{unit.path}." if unit.path else ""
            for name, value in own:
                value = value.detach()
                yield pre + name, (value.to(dtype) if value.is_floating_point() else value).contiguous()
            del real

    return header, generate


def init_checkpoint(config: ModelConfig, folder: str | os.PathLike, seed: int = 0, dtype: str = "fp16",
                    progress: bool = False, unit_bytes: int = UNIT_BYTES) -> dict:
    """Write ``folder`` (config.json + one safetensors per stage) with seeded weights, atomically.

    Returns {path, dtype, seed, params, files: [{name, bytes, sha256}]}. The caller checks that
    ``folder`` may be replaced (it is replaced whole). ``unit_bytes`` bounds what is materialised
    at once; the tensors depend on it (each unit has its own seed), so it is not a CLI flag."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    torch_dtype, files, params = DTYPES[dtype], [], 0
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(config_text(config))
        files.append({"name": CONFIG_FILE, "bytes": (tmp / CONFIG_FILE).stat().st_size,
                      "sha256": sha256_file(tmp / CONFIG_FILE)})
        for stage in STAGES:
            header, generate = stage_tensors(config, stage, seed, torch_dtype, unit_bytes)
            numel = sum(int(torch.Size(s).numel()) for _, s, _ in header)
            params += numel
            bar = tqdm(total=numel, desc=f"init {config.name} {stage}", unit="param", unit_scale=True,
                       disable=not progress)
            path = tmp / STAGE_FILES[stage]

            def counted():
                for name, t in generate():
                    yield name, t
                    bar.update(t.numel())
            size, digest = write_safetensors(path, header, counted(),
                                             metadata={"stage": stage, "model": config.name})
            bar.close()
            files.append({"name": STAGE_FILES[stage], "bytes": size, "sha256": digest})
            log.info("wrote %s: %d tensors, %.1f MB", path.name, len(header), size / 1e6)
    return {"path": str(Path(folder)), "dtype": dtype, "seed": seed, "params": params, "files": files}
