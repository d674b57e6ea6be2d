"""Fixed-shape streaming caches and their roll (push) rule.

The cache is a flat ``dict[str, Tensor]`` whose shapes never change, so a compiled DiT step can
take it as explicit state (Core ML states, ExecuTorch mutable buffers, ONNX I/O). Per block:

- LCHA: ``kv`` (W, B, H, d, d) and ``ksum`` (W, B, H, d): one linear-attention state per cached
  chunk, so the oldest chunk can be evicted exactly; ``vtail`` (B, C, kt-1, h, w): the V frames
  the causal local conv needs from the previous chunk.
- SSA / dense: ``k``, ``v`` (B, H, W*n, d): RoPE-rotated keys and values of the cached chunks.
- ``window_valid`` (W,): 1 for slots that hold a chunk; empty slots are masked for softmax.
  (Empty LCHA slots are zeros, which add nothing to the sums.)
"""

from __future__ import annotations

import torch

VALID_KEY = "window_valid"


def push_entries(cache: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the cache with the newest chunk's entries appended and the oldest chunk evicted."""
    out: dict[str, torch.Tensor] = {}
    for key, old in cache.items():
        kind = key.rsplit(".", 1)[-1]
        if key == VALID_KEY:
            out[key] = torch.cat([old[1:], old.new_ones(1)])
            continue
        new = entries[key]
        if kind in ("kv", "ksum"):
            out[key] = torch.cat([old[1:], new.unsqueeze(0)], dim=0)
        elif kind in ("k", "v"):
            out[key] = torch.cat([old[:, :, new.shape[2] :], new], dim=2)
        elif kind == "vtail":
            out[key] = new
        else:
            raise KeyError(f"unknown cache entry kind {kind!r} in {key!r}")
    return out


def slot_mask(valid: torch.Tensor, mask_value: float) -> torch.Tensor:
    """Additive per-slot mask: 0 for filled slots, ``mask_value`` for empty ones."""
    return (1.0 - valid) * mask_value


def cache_nbytes(cache: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in cache.values())
