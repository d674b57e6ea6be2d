"""GPTQ weight rounding on the plan's own grid, through coremltools' GPTQ implementation.

GPTQ (Frantar et al. 2022) rounds a Linear weight column by column and pushes each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian H = 2 X^T X of
the layer's calibration inputs, so the layer *output* error is minimized rather than the weight
error. ``coremltools.optimize.torch.layerwise_compression.GPTQ`` implements it (Hessian
accumulation, dampening, Cholesky inverse, lazy block updates). Its own quantizer derives a
min-max asymmetric-style grid; we hand it ours instead: symmetric, restricted range
[-(2^(b-1)-1), 2^(b-1)-1], one MSE-optimal scale per output channel (``observers.weight_scale``),
which is the grid Core ML (``linear_symmetric``), QNN's per-channel observers and our ONNX QDQ all
re-derive from a weight by min-max. To make that re-derivation exact, every row must reach the
grid's end: a row whose largest |q| fell short after error feedback gets its largest entry moved
to the end (logged; rare, since the MSE scale clips the largest entries of most rows).

The rounded weights are data, not a recipe: they travel with the plan (``plan.py``) and are
substituted into the float module before export, so every target compiles the same values the
fake-quant evaluation scored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .observers import weight_scale
from .schemes import weight_scheme

log = logging.getLogger(__name__)

DAMPENING = 0.01  # fraction of mean(diag H) added to the diagonal (the GPTQ paper's default)
ACT_ORDER = True  # round columns in descending Hessian-diagonal order (GPTQ's "act-order")
CONFIG = {"dampening": DAMPENING, "act_order": ACT_ORDER, "grid": "symmetric-restricted, mse scale"}


class _PlanGrid:
    """The library quantizer's interface (ready, scale, zero_point, max_q) over our symmetric grid:
    ``q = clamp(round(w/s) + z, 0, 2z)`` with ``z = qmax`` is ``round(w/s)`` clamped to [-qmax, qmax]."""

    def __init__(self, scale: torch.Tensor, qmax: int):
        self.scale = scale
        self.zero_point = torch.full_like(scale, float(qmax))
        self.max_q = torch.tensor(float(2 * qmax))

    def ready(self) -> bool:
        return True


def _algorithm(layer: nn.Linear):
    from coremltools.optimize.torch.layerwise_compression.algorithms import GPTQ, ModuleGPTQConfig

    # bits are irrelevant here (the grid is ours); 4 keeps the library's config validation happy
    return GPTQ(layer, ModuleGPTQConfig(weight_dtype="uint4", hessian_dampening=DAMPENING,
                                        use_activation_order_heuristic=ACT_ORDER))


def hit_grid_ends(w_q: torch.Tensor, scale: torch.Tensor, qmax: int) -> tuple[torch.Tensor, int]:
    """Make every row's max |q| equal qmax (see the module docstring); returns (weights, rows fixed)."""
    q = torch.round(w_q / scale)
    short = q.abs().amax(1) < qmax
    n = int(short.sum())
    if n:
        rows = torch.nonzero(short).flatten()
        cols = q[rows].abs().argmax(1)
        sign = torch.sign(q[rows, cols])
        sign[sign == 0] = 1
        q[rows, cols] = sign * qmax
    return q * scale, n


def gptq_round(layers: Mapping[str, nn.Linear], schemes: Mapping[str, str], run_calls: Iterable,
               progress: bool = False) -> dict[str, torch.Tensor]:
    """GPTQ-rounded weights {layer: tensor} for ``schemes`` ({layer: "int4-pc-gptq"...}).

    ``run_calls`` is an iterable of zero-argument callables that run the float stage once each on
    calibration inputs; forward hooks feed every listed layer's inputs to its Hessian. The module
    is left as it was (weights restored)."""
    algs, hooks = {}, []
    for name, scheme in schemes.items():
        layer = layers[name]
        if not isinstance(layer, nn.Linear) or weight_scheme(scheme).rounding != "gptq":
            raise ValueError(f"GPTQ rounding is for Linear layers with a -gptq scheme, not {name!r} ({scheme})")
        algs[name] = _algorithm(layer)

        def hook(_m, args, out, alg=algs[name]):
            x = args[0].detach()
            alg.add_batch(x.reshape(-1, x.shape[-1]).float(), out)

        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for run in run_calls:
                run()
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, torch.Tensor] = {}
    fixed = 0
    for name, alg in tqdm(list(algs.items()), desc="GPTQ", unit="layer", disable=not progress):
        layer, ws = layers[name], weight_scheme(schemes[name])
        qmax = (1 << (ws.bits - 1)) - 1
        original = layer.weight.data
        scale = weight_scale(original.float(), ws).reshape(-1, 1)
        alg._quantizer = _PlanGrid(scale, qmax)  # the library's hook for a pre-computed grid
        try:
            alg._compress_impl()  # compress() would also register Core ML torch-side metadata; we only want the values
            w_q, n = hit_grid_ends(layer.weight.data.float(), scale, qmax)
        finally:
            layer.weight.data = original
            alg.cleanup()
        fixed += n
        out[name] = w_q.to(original.dtype)
    if fixed:
        log.info("GPTQ: %d rows moved their largest entry to the grid end (exact min-max re-derivation)", fixed)
    return out


def on_grid(w: torch.Tensor, scheme: str) -> bool:
    """Whether min-max re-quantization of ``w`` under ``scheme``'s grid reproduces ``w`` exactly."""
    ws = weight_scheme(scheme)
    qmax = (1 << (ws.bits - 1)) - 1
    w2 = w.detach().float().reshape(w.shape[0], -1)
    s = w2.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    return bool(torch.allclose(torch.round(w2 / s) * s, w2, rtol=0, atol=float(s.max()) * 1e-3))
