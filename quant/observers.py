"""Observers: weight scales (per-tensor / per-channel / per-block) and activation ranges.

Built on ``torch.ao.quantization.observer`` where it fits:
- per-channel and per-tensor weight min/max come from ``PerChannelMinMaxObserver`` /
  ``MinMaxObserver``; the scale uses the restricted symmetric range [-(2^(b-1)-1), 2^(b-1)-1]
  that Core ML (``LINEAR_SYMMETRIC``) and the XNNPACK PT2E int8 weight observer use.
- per-block weights use torchao's ``choose_qparams_affine`` (the exact 8da4w convention).
- activation ranges come from one ``HistogramObserver`` per layer: its min/max (``minmax``), its
  L2-optimal range search (``mse``), and a percentile read off its histogram (``percentile``,
  which torch.ao does not offer, hence the few lines below).
What neither library has is written here: the per-channel MSE-optimal weight clip search.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
)

from .errors import CalibrationError
from .schemes import WeightScheme

MSE_CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def weight_amax(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """max |w| per output channel (shape (O, 1, ...)) or per tensor (shape ())."""
    w = w.detach().float()
    if granularity == "channel":
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        obs(w)
        amax = torch.maximum(obs.min_val.abs(), obs.max_val.abs())
        return amax.reshape(-1, *([1] * (w.dim() - 1)))
    obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    obs(w)
    return torch.maximum(obs.min_val.abs(), obs.max_val.abs())


def _round_clamp(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def weight_scale(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Symmetric scale of a per-tensor / per-channel linear scheme (broadcastable to ``w``)."""
    if scheme.kind != "linear" or scheme.granularity == "block":
        raise ValueError(f"weight_scale is for per-tensor/per-channel linear schemes, not {scheme.name}")
    qmax = _qmax(scheme.bits)
    amax = weight_amax(w, scheme.granularity).clamp_min(1e-12)
    if scheme.range_method == "minmax":
        return amax / qmax
    # MSE-optimal clip per channel: torch.ao has no per-channel MSE weight observer.
    w = w.detach().float()
    dims = tuple(range(1, w.dim())) if scheme.granularity == "channel" else tuple(range(w.dim()))
    best_err, best = None, None
    for r in MSE_CLIP_GRID:
        s = amax * r / qmax
        err = (_round_clamp(w, s, qmax) - w).pow(2).sum(dim=dims, keepdim=scheme.granularity == "channel")
        if best_err is None:
            best_err, best = err, s.clone()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
    return best


def block_qparams(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """torchao per-block symmetric qparams over the flattened input dim (8da4w layout)."""
    from .torchao_compat import import_torchao

    import_torchao()  # quiet the CUDA-only kernel warnings
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    w2 = w.detach().float().reshape(w.shape[0], -1)
    if w2.shape[1] % scheme.block:
        raise ValueError(f"{scheme.name}: input size {w2.shape[1]} is not a multiple of the block {scheme.block}")
    qmin, qmax = -(1 << (scheme.bits - 1)), _qmax(scheme.bits)
    block = (1, scheme.block)
    scale, zp = choose_qparams_affine(w2, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax,
                                      eps=torch.finfo(torch.float32).eps)
    return scale, zp, block


# ---- activations -------------------------------------------------------------------------------

@dataclass
class ActStats:
    """Per-layer input statistics over the calibration set (JSON-serializable)."""

    min: float
    max: float
    absmax: float
    mse_lo: float
    mse_hi: float
    pct_lo: float
    pct_hi: float
    count: int
    mean_sq: list[float]  # per input feature E[x_j^2] (last dim for Linear, channel dim for conv)

    def range(self, method: str) -> tuple[float, float]:
        if method == "minmax":
            return self.min, self.max
        if method == "mse":
            return self.mse_lo, self.mse_hi
        if method == "percentile":
            return self.pct_lo, self.pct_hi
        raise ValueError(f"unknown range method {method!r}; use minmax, percentile or mse")

    def to_dict(self) -> dict:
        return asdict(self)


class LayerInputObserver:
    """Histogram of a layer's input plus per-feature second moments; NaN/inf raise naming the layer."""

    def __init__(self, name: str, feature_dim: int, percentile: float = 99.99, bins: int = 2048):
        self.name = name
        self.feature_dim = feature_dim  # -1 for Linear (features last), 1 for conv (channels)
        self.percentile = percentile
        self.hist = HistogramObserver(bins=bins, dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        self.sq_sum: torch.Tensor | None = None
        self.rows = 0
        self.count = 0

    def __call__(self, x: torch.Tensor, where: str = "") -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "inf"
            raise CalibrationError(f"{bad} in the input of layer {self.name!r}{where}")
        self.hist(x)
        xf = x.movedim(self.feature_dim, -1).reshape(-1, x.shape[self.feature_dim])
        s = xf.pow(2).sum(0)
        self.sq_sum = s if self.sq_sum is None else self.sq_sum + s
        self.rows += xf.shape[0]
        self.count += 1

    def _percentile_range(self) -> tuple[float, float]:
        h = self.hist.histogram.double()
        lo, hi = float(self.hist.min_val), float(self.hist.max_val)
        if h.sum() <= 0 or hi <= lo:
            return lo, hi
        cdf = torch.cumsum(h, 0) / h.sum()
        width = (hi - lo) / h.numel()
        q = 1.0 - self.percentile / 100.0
        i_lo = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)))
        i_hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - q, dtype=cdf.dtype)))
        return min(lo + i_lo * width, 0.0), max(lo + (i_hi + 1) * width, 0.0)

    def stats(self) -> ActStats:
        if self.count == 0:
            raise ValueError(f"layer {self.name!r} saw no calibration data")
        lo, hi = float(self.hist.min_val), float(self.hist.max_val)
        scale, zp = self.hist.calculate_qparams()  # HistogramObserver's L2-optimal search, quint8
        scale, zp = float(scale), int(zp)
        mse_lo, mse_hi = (0 - zp) * scale, (255 - zp) * scale
        p_lo, p_hi = self._percentile_range()
        return ActStats(lo, hi, max(abs(lo), abs(hi)), min(mse_lo, 0.0), max(mse_hi, 0.0), p_lo, p_hi,
                        self.count, (self.sq_sum / max(self.rows, 1)).tolist())


def act_qparams(lo: float, hi: float, bits: int, symmetric: bool | None = None) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) of a per-tensor range; int16 is symmetric, int8 affine."""
    symmetric = bits == 16 if symmetric is None else symmetric
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(abs(lo), abs(hi), 1e-12)
        return amax / qmax, 0, -qmax, qmax
    scale = max(hi - lo, 1e-12) / (qmax - qmin)
    zp = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zp, qmin, qmax


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    err = (ref.double() - x.double()).pow(2).sum().item()
    sig = ref.double().pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(max(sig, 1e-30) / err)
