"""Weights stored in fp16/bf16, host compute in fp32: one layer's weights are widened at a time.

A paper-scale checkpoint is kept in memory in its own dtype (fp16: 3.7 GB for the 1.8B DiT, not
7.3 GB), but this machine cannot compute in fp16: without AVX512-FP16, torch's CPU fp16 matmul
runs at about 0.3 GFLOP/s against about 30 (fp32) or 80 (bf16) measured here. And the float
reference that every compiled artifact is scored against should be as exact as the host allows.
So each module that owns low-precision weights gets a forward pre-hook that swaps in fp32 copies
of its own parameters and buffers and a post-hook (run even on error) that swaps them back: the
extra memory is one layer's fp32 weights. Floating inputs of a hooked module are widened too (the
model code casts activations to its weights' dtype before some layers; those roundings to fp16
are the only ones left, as an fp16 model would make them). Elementwise uses of small parameters outside a module's
``forward`` (modulation tables) follow torch's type promotion to fp32.

Exporting (torch.export, ONNX, ExecuTorch, Core ML) never sees these hooks: targets export
``promoted(module)``, a plain fp32 copy of the (piece of the) graph they convert.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

LOW_PRECISION = (torch.float16, torch.bfloat16)
_STASH = "_s2dit_stored_weights"
_HANDLES = "_s2dit_upcast_handles"


def _widen(module: nn.Module, args) -> None:
    stash = {}
    for name, p in module._parameters.items():
        if p is not None and p.dtype in LOW_PRECISION:
            stash[("p", name)] = p.data
            p.data = p.data.float()
    for name, b in module._buffers.items():
        if b is not None and b.dtype in LOW_PRECISION:
            stash[("b", name)] = b
            module._buffers[name] = b.float()
    object.__setattr__(module, _STASH, stash)
    # activations the model code cast to the weights' dtype (``x.to(weight.dtype)``) come back to fp32
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in LOW_PRECISION else a for a in args)


def _restore(module: nn.Module, args, output) -> None:
    for (kind, name), stored in getattr(module, _STASH, {}).items():
        if kind == "p":
            module._parameters[name].data = stored
        else:
            module._buffers[name] = stored
    object.__setattr__(module, _STASH, {})


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the module's floating-point weights are stored in (fp32 for a weightless module)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def compute_in_fp32(module: nn.Module) -> nn.Module:
    """Hook every submodule that owns fp16/bf16 tensors so its forward computes in fp32 (in place)."""
    for m in module.modules():
        own = [*m._parameters.values(), *m._buffers.values()]
        if any(t is not None and t.dtype in LOW_PRECISION for t in own) and not hasattr(m, _HANDLES):
            m.register_forward_pre_hook(_widen)
            m.register_forward_hook(_restore, always_call=True)
            object.__setattr__(m, _HANDLES, True)
    return module


def remove_compute_hooks(module: nn.Module) -> nn.Module:
    """Drop the hooks (by identity in each module's hook dicts, so a deep copy's hooks go too)."""
    for m in module.modules():
        for hooks, fn in ((m._forward_pre_hooks, _widen), (m._forward_hooks, _restore)):
            for key in [k for k, v in hooks.items() if v is fn]:
                del hooks[key]
                m._forward_hooks_always_called.pop(key, None)
        if hasattr(m, _HANDLES):
            object.__delattr__(m, _HANDLES)
    return module


def has_compute_hooks(module: nn.Module) -> bool:
    return any(hasattr(m, _HANDLES) for m in module.modules())


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the module computes in on the host: fp32 when hooked, else its weights' dtype."""
    return torch.float32 if has_compute_hooks(module) else weights_dtype(module)


@contextlib.contextmanager
def hooks_suspended(module: nn.Module) -> Iterator[nn.Module]:
    """The module without its widening hooks for the duration (tracing sees the stored dtype)."""
    hooked = [m for m in module.modules() if hasattr(m, _HANDLES)]
    remove_compute_hooks(module)
    try:
        yield module
    finally:
        for m in hooked:
            compute_in_fp32(m)


def promoted(module: nn.Module) -> nn.Module:
    """A hook-free fp32 copy for export (the caller decides how much of the model that is)."""
    if weights_dtype(module) == torch.float32 and not has_compute_hooks(module):
        return module
    return remove_compute_hooks(copy.deepcopy(module)).float()


__all__ = ["LOW_PRECISION", "compute_dtype", "compute_in_fp32", "has_compute_hooks", "hooks_suspended", "promoted",
           "remove_compute_hooks", "weights_dtype"]
