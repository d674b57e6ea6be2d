"""Host <-> device tensor mapping for rewritten stages.

A rewritten graph keeps the stage's I/O contract on the host side but lays tensors out for the
device: rank <= 4, channel-first, fp16-safe scales. Each ``IOMap`` is that mapping as data
(JSON-serialisable, stored in the artifact), applied on the host in fp32:

    device = reshape(transpose(host * scale, perm), device_shape)     (or a one-hot over ``onehot``)
    host   = transpose(reshape(device, permuted host shape), perm^-1) / scale
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def feature_name(name: str) -> str:
    """A Core ML feature name for a contract name (``cache.groups.0.high.0.kv`` -> ``cache__groups_0_high_0_kv``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name.replace(".", "__", 1))


@dataclass(frozen=True)
class IOMap:
    name: str
    device_name: str
    host_shape: tuple[int, ...]
    device_shape: tuple[int, ...]
    perm: tuple[int, ...] | None = None
    scale: float = 1.0
    onehot: tuple[float, ...] | None = None
    sinusoidal: int | None = None  # device = sinusoidal features (B, dim, 1, 1) of t (fp32 on the host)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IOMap:
        tup = lambda v: tuple(v) if v is not None else None
        return cls(d["name"], d["device_name"], tuple(d["host_shape"]), tuple(d["device_shape"]),
                   tup(d.get("perm")), float(d.get("scale", 1.0)), tup(d.get("onehot")), d.get("sinusoidal"))

    def to_device(self, host: np.ndarray) -> np.ndarray:
        host = np.asarray(host)
        if tuple(host.shape) != self.host_shape:
            raise ValueError(f"input {self.name!r} has shape {tuple(host.shape)}, the contract says {self.host_shape}")
        if self.onehot is not None:
            sched = np.asarray(self.onehot, dtype=np.float64)
            vals = np.asarray(host, dtype=np.float64).reshape(-1)
            out = np.zeros(self.device_shape, dtype=np.float32)
            for b, v in enumerate(vals):
                hit = np.flatnonzero(np.abs(sched - v) <= 1e-6)
                if hit.size == 0:
                    raise ValueError(f"{self.name}={v} is not in the folded schedule {list(self.onehot)}; "
                                     "recompile without fold_schedule or use a schedule value")
                out[b, hit[0]] = 1.0
            return out
        if self.sinusoidal is not None:
            return sinusoidal_features(host, self.sinusoidal).reshape(self.device_shape)
        x = host.astype(np.float32) * np.float32(self.scale) if host.dtype.kind == "f" else host
        if self.perm is not None:
            x = np.transpose(x, self.perm)
        return np.ascontiguousarray(x.reshape(self.device_shape))

    def to_host(self, dev: np.ndarray) -> np.ndarray:
        x = np.asarray(dev)
        if self.perm is not None:
            permuted = tuple(self.host_shape[p] for p in self.perm)
            x = np.transpose(x.reshape(permuted), np.argsort(self.perm))
        x = x.reshape(self.host_shape)
        if x.dtype.kind == "f":
            x = x.astype(np.float32) / np.float32(self.scale)
        return x


def sinusoidal_features(t: np.ndarray, dim: int) -> np.ndarray:
    """``model_zoo.blocks.sinusoidal_embedding`` in numpy fp32: [cos(1000 t f), sin(1000 t f)]."""
    half = dim // 2
    freqs = np.exp(-np.log(np.float32(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half))
    args = (np.asarray(t, dtype=np.float32).reshape(-1) * np.float32(1000.0))[:, None] * freqs.astype(np.float32)
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1).astype(np.float32)


def identity(name: str, shape: tuple[int, ...]) -> IOMap:
    return IOMap(name, feature_name(name), tuple(shape), tuple(shape))


def maps_to_json(maps: list[IOMap]) -> list[dict[str, Any]]:
    return [m.to_dict() for m in maps]


def maps_from_json(data: list[dict[str, Any]]) -> list[IOMap]:
    return [IOMap.from_dict(d) for d in data]
