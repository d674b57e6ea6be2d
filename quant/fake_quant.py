"""Fake quantization: quantize-dequantize weights and layer inputs inside the float model.

``quantized(module, layers)`` is a context manager that swaps each listed layer's weight for its
fake-quantized copy and adds a forward pre-hook that fake-quantizes the layer input; everything
is restored on exit, so sensitivity analysis can quantize one layer at a time in place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .observers import act_qparams, block_qparams, weight_scale
from .schemes import WeightScheme, act_scheme, weight_scheme

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def quantizable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Layers whose weight a plan can quantize (Linear, Conv1d/2d/3d, Embedding), in module order."""
    return {n: m for n, m in module.named_modules() if isinstance(m, QUANTIZABLE) and n}


def input_feature_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _lut_dense(w: torch.Tensor, bits: int) -> torch.Tensor:
    """k-means palettization per tensor, exactly as coremltools' palettize_weights computes it."""
    try:
        from coremltools.optimize._utils import lut_to_dense
        from coremltools.optimize.coreml._quantization_passes import palettize_weights
    except ImportError:  # pragma: no cover - coremltools is an optional extra
        return _lut_dense_torch(w, bits)
    import warnings

    arr = w.detach().float().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn version chatter from coremltools' k-means
        params = palettize_weights.blockwise_compress(arr, "KMEANS", bits, [0] * arr.ndim)
    dense = lut_to_dense(params.indices, params.lut, vector_axis=None)
    return torch.from_numpy(dense.astype("float32")).reshape(w.shape)


def _lut_dense_torch(w: torch.Tensor, bits: int, iters: int = 30) -> torch.Tensor:
    """1-D Lloyd k-means fallback when coremltools is absent (quantile init)."""
    x = w.detach().float().flatten()
    k = 1 << bits
    centers = torch.quantile(x[:: max(1, x.numel() // 100000)], torch.linspace(0, 1, k))
    for _ in range(iters):
        idx = torch.bucketize(x, (centers[1:] + centers[:-1]) / 2)
        sums = torch.zeros(k).index_add_(0, idx, x)
        cnt = torch.zeros(k).index_add_(0, idx, torch.ones_like(x))
        centers = torch.where(cnt > 0, sums / cnt.clamp_min(1), centers).sort().values
    idx = torch.bucketize(x, (centers[1:] + centers[:-1]) / 2)
    return centers[idx].reshape(w.shape)


def fake_quant_weight(w: torch.Tensor, scheme: WeightScheme | str) -> torch.Tensor:
    """Dequantized copy of ``w`` under ``scheme`` (output channels on dim 0)."""
    s = weight_scheme(scheme) if isinstance(scheme, str) else scheme
    w = w.detach()
    if s.kind == "float":
        return w.to(torch.float16).to(w.dtype)
    if s.kind == "lut":
        return _lut_dense(w, s.bits).to(w.dtype)
    if s.granularity == "block":
        from .torchao_compat import import_torchao

        import_torchao()  # quiet the CUDA-only kernel warnings
        from torchao.quantization.quant_primitives import (
            dequantize_affine,
            quantize_affine,
        )

        scale, zp, block = block_qparams(w, s)
        w2 = w.float().reshape(w.shape[0], -1)
        qmin, qmax = -(1 << (s.bits - 1)), (1 << (s.bits - 1)) - 1
        q = quantize_affine(w2, block, scale, zp, torch.int8, qmin, qmax)
        return dequantize_affine(q, block, scale, zp, torch.int8, qmin, qmax).reshape(w.shape).to(w.dtype)
    qmax = (1 << (s.bits - 1)) - 1
    scale = weight_scale(w, s)
    return (torch.clamp(torch.round(w.float() / scale), -qmax, qmax) * scale).to(w.dtype)


def fake_quant_act(x: torch.Tensor, scheme: str, act_range: tuple[float, float] | None,
                   feature_dim: int = -1) -> torch.Tensor:
    """Quantize-dequantize a layer input: static per-tensor range, or dynamic per token."""
    a = act_scheme(scheme)
    if a.is_float:
        return x
    if a.dynamic:  # per-token (all dims but the feature dim) asymmetric int8, as 8da4w does
        xf = x.movedim(feature_dim, -1)
        lo = xf.amin(-1, keepdim=True).clamp(max=0)
        hi = xf.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 255).clamp_min(1e-12)
        zp = torch.round(-128 - lo / scale)
        q = torch.clamp(torch.round(xf / scale) + zp, -128, 127)
        return ((q - zp) * scale).movedim(-1, feature_dim)
    if act_range is None:
        raise ValueError(f"activation scheme {scheme!r} needs a calibrated range")
    scale, zp, qmin, qmax = act_qparams(act_range[0], act_range[1], a.bits)
    if a.bits <= 8:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


class WeightCache:
    """Memo of fake-quantized weights per (layer, scheme): k-means is slow, layers are revisited.

    GPTQ-rounded weights depend on calibration data, not only on the float weight, so they are
    ``put`` here by whoever computed them (``gptq.gptq_round``) or loaded them (a plan's sidecar)."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, str], torch.Tensor] = {}

    def put(self, name: str, scheme: str, weight: torch.Tensor) -> None:
        self._store[(name, scheme)] = weight

    def get(self, name: str, layer: nn.Module, scheme: str) -> torch.Tensor:
        key = (name, scheme)
        if key not in self._store:
            if weight_scheme(scheme).rounding == "gptq":
                raise KeyError(f"layer {name!r}: no GPTQ-rounded weight for {scheme} (computed by gptq.gptq_round "
                               "during calibration; a plan carries it in its sidecar)")
            self._store[key] = fake_quant_weight(layer.weight, scheme)
        return self._store[key]


@contextlib.contextmanager
def quantized(module: nn.Module, layers: Mapping[str, object], cache: WeightCache | None = None,
              weights: bool = True, acts: bool = True,
              rounded: Mapping[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
    """Fake-quantize ``layers`` ({name: LayerQuant-like with .weight, .act, .act_range}) in place;
    ``rounded`` gives the GPTQ-rounded weights of ``-gptq`` layers ({name: tensor})."""
    mods = dict(module.named_modules())
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = []
    cache = cache or WeightCache()
    for name, w in (rounded or {}).items():
        if name in layers:
            cache.put(name, layers[name].weight, w)
    try:
        for name, lq in layers.items():
            if name not in mods:
                raise KeyError(f"plan names layer {name!r}, which {type(module).__name__} does not have")
            layer = mods[name]
            if weights and getattr(lq, "weight", "fp16") != "fp16":
                saved.append((layer, layer.weight.data))
                layer.weight.data = cache.get(name, layer, lq.weight)
            act = getattr(lq, "act", "float")
            if acts and act != "float" and not isinstance(layer, nn.Embedding):
                rng, fdim = getattr(lq, "act_range", None), input_feature_dim(layer)

                def pre(_m, args, act=act, rng=rng, fdim=fdim):
                    return (fake_quant_act(args[0], act, rng, fdim), *args[1:])

                hooks.append(layer.register_forward_pre_hook(pre))
        yield module
    finally:
        for h in hooks:
            h.remove()
        for layer, data in saved:
            layer.weight.data = data
