"""The op list of a torch module without running it: every ATen op on meta tensors, with its work.

The cost model needs, per op, the multiply-adds, the weights it reads and the activations it
moves. Running the module on the meta device under a ``TorchDispatchMode`` gives exactly the ops
torch.export would see (post-dispatch ATen), with shapes, in seconds and without memory even at
1.8B parameters. Weights are told apart from activations by provenance: a tensor is a weight if
it is a parameter or buffer or a view / cast / dequantize of one. Each op also carries the module
path it ran in (for the per-block breakdown). Calibration models and ``bench MODEL --device`` use
this; compiled artifacts have their own readers (``artifact_ops``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("matmul", "conv", "attention", "vector", "layout")


@dataclass(frozen=True)
class Op:
    """One op as the cost model sees it. Element counts, not bytes: the precision decides bytes.

    ``weight_bits`` / ``act_bits`` are set when the artifact fixes them (a palettized const, an
    int8 tensor); None means "the precision the estimate is made at"."""

    name: str
    kind: str
    flops: float
    weight_elems: int
    act_elems: int
    group: str = ""
    unit: str = "npu"
    weight_bits: int | None = None
    act_bits: int | None = None

    def with_unit(self, unit: str) -> "Op":
        return replace(self, unit=unit)


# ops that only re-describe memory (free on every backend we model)
_VIEWS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "alias", "t", "slice",
          "select", "as_strided", "detach", "lift_fresh", "_reshape_alias", "unbind", "split", "split_with_sizes",
          "chunk", "narrow", "view_as", "expand_as", "unflatten", "flatten", "lift_fresh_copy"}
# ops that move data (a real copy on an accelerator)
_LAYOUT = {"permute", "transpose", "clone", "contiguous", "_to_copy", "copy", "copy_", "cat", "stack", "pad",
           "constant_pad_nd", "repeat", "index", "index_select", "embedding", "gather", "roll", "flip",
           "pixel_shuffle", "pixel_unshuffle", "upsample_nearest2d", "upsample_nearest3d", "_unsafe_index",
           "new_zeros", "zeros_like", "ones_like", "full_like", "fill", "fill_", "masked_fill", "where",
           "repeat_interleave", "zero_", "empty_like", "new_empty", "new_ones", "scatter", "slice_scatter",
           "select_scatter", "upsample_bilinear2d", "_upsample_nearest_exact2d", "im2col", "col2im"}
# weight provenance survives these (a transposed / cast / dequantized weight is still a weight)
_WEIGHT_PASS = _VIEWS | {"permute", "transpose", "clone", "contiguous", "_to_copy", "copy", "dequantize",
                         "dequantize_per_tensor", "dequantize_per_channel", "mul", "to", "repeat"}
# vector ops that cost several flops per output element
_HEAVY = {"native_layer_norm": 5, "layer_norm": 5, "native_group_norm": 5, "group_norm": 5,
          "_softmax": 5, "softmax": 5, "_log_softmax": 5, "gelu": 8, "silu": 4, "sigmoid": 4, "tanh": 4,
          "exp": 4, "rsqrt": 2, "sqrt": 2, "pow": 2, "native_batch_norm": 4, "_native_batch_norm_legit_no_training": 4,
          "hardswish": 3, "erf": 6, "cos": 4, "sin": 4, "var_mean": 3, "mean": 1, "sum": 1, "amax": 1}


def _base(func) -> str:
    return func._schema.name.split("::")[-1]


def _numel(t) -> int:
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def _conv_flops(args, out) -> float:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    k = math.prod(w.shape[2:])
    if transposed:  # weight (Cin, Cout/g, k...): every input element feeds Cout/g * k outputs
        return 2.0 * x.numel() * w.shape[1] * k
    return 2.0 * out.numel() * w.shape[1] * k  # w.shape[1] is already Cin / groups


def _sdpa_flops(q, k, v) -> float:
    lead = math.prod(q.shape[:-2])
    L, E, S, Ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    return lead * (2.0 * L * S * E + 2.0 * L * S * Ev + 5.0 * L * S)


class _Tracer(TorchDispatchMode):
    def __init__(self, weights: set[int], path: Callable[[], str]):
        super().__init__()
        self.weights = weights
        self.keep: list[torch.Tensor] = []  # keeps marked tensors alive, so their ids stay unique
        self.path = path
        self.ops: list[Op] = []

    def _is_w(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.weights

    def _mark(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.weights.add(id(t))
                self.keep.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _base(func)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        w_in = [t for t in ins if self._is_w(t)]
        if name in _WEIGHT_PASS and ins and len(w_in) == len(ins):
            self._mark(out)  # a weight re-described: no work yet
            return out
        if name in _VIEWS:
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        n_out = sum(_numel(t) for t in outs)
        w_elems = sum(_numel(t) for t in w_in)
        if name in ("embedding", "index_select", "index", "_unsafe_index", "gather") and w_in:
            w_elems = min(w_elems, n_out)  # a lookup reads the rows it gathers, not the whole table
        a_elems = sum(_numel(t) for t in ins if not self._is_w(t)) + n_out
        first = outs[0] if outs else None
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
            flops = 2.0 * math.prod(a.shape) * b.shape[-1]
            kind = "matmul" if (self._is_w(a) or self._is_w(b)) else "attention"
        elif name in ("convolution", "_convolution", "conv2d", "conv1d", "conv3d"):
            # a pointwise conv is a matmul (the ANE rewrite turns every Linear into one)
            flops, kind = _conv_flops(args, first), ("matmul" if math.prod(args[1].shape[2:]) == 1 else "conv")
        elif "scaled_dot_product" in name:
            flops, kind = _sdpa_flops(args[0], args[1], args[2]), "attention"
        elif name in _LAYOUT:
            flops, kind = 0.0, "layout"
        else:
            flops, kind = float(_HEAVY.get(name, 1) * n_out), "vector"
        self.ops.append(Op(name, kind, flops, w_elems, a_elems, self.path()))
        return out


def trace_ops(module: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Op]:
    """Every compute op of ``module(*args, **kwargs)``; module and inputs should be on the meta device.

    Inputs on another device are moved to meta (shapes are all that matter)."""
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) and not x.is_meta else x  # noqa: E731
    args = tuple(_tree_map(to_meta, a) for a in args)
    kwargs = {k: _tree_map(to_meta, v) for k, v in (kwargs or {}).items()}
    weights = {id(t) for t in (*module.parameters(), *module.buffers())}
    stack: list[str] = []
    names = {m: n for n, m in module.named_modules()}
    handles = []

    def enter(mod, _args):
        stack.append(names[mod])

    def leave(_mod, _args, _out):  # must return None: a forward hook's return value replaces the output
        stack.pop()

    for m in names:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    tracer = _Tracer(weights, lambda: stack[-1] if stack else "")
    try:
        with torch.no_grad(), tracer:
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return tracer.ops


def _tree_map(fn, x):
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    return fn(x)


def summarize(ops: list[Op]) -> dict[str, Any]:
    """Totals per kind (GFLOPs, M weight elements, M activation elements) and in all."""
    by = {k: {"ops": 0, "gflops": 0.0, "weight_melems": 0.0, "act_melems": 0.0} for k in KINDS}
    for o in ops:
        b = by[o.kind]
        b["ops"] += 1
        b["gflops"] += o.flops / 1e9
        b["weight_melems"] += o.weight_elems / 1e6
        b["act_melems"] += o.act_elems / 1e6
    return {"ops": len(ops), "gflops": sum(o.flops for o in ops) / 1e9,
            "weight_melems": sum(o.weight_elems for o in ops) / 1e6, "by_kind": by}
