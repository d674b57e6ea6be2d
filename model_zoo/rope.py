"""3D rotary position embedding (time, height, width) in the "rotate half" layout.

The head dimension is split into pairs like Wan2.1: time gets what remains after height and width
take ``2 * (d // 6)`` dims each. Pair ``i`` rotates dims ``i`` and ``i + d/2``; that layout needs only
slices and a concat (no strided reshapes), which keeps it friendly to mobile compilers. Positions
can be offset in time by a tensor so a streaming chunk gets its absolute frame index.
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs given to (time, height, width)."""
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def _inv_freq(pairs: int, theta: float) -> torch.Tensor:
    if pairs == 0:
        return torch.zeros(0, dtype=torch.float64)
    return theta ** (-torch.arange(pairs, dtype=torch.float64) / pairs)


def rope_angles(
    grid: tuple[int, int, int],
    head_dim: int,
    theta: float = 10000.0,
    frame_offset: int | torch.Tensor = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Angles (N, head_dim/2) for the tokens of a (t, h, w) grid in frame-major order."""
    t, h, w = grid
    pt, ph, pw = axis_pairs(head_dim)
    ft, fh, fw = (_inv_freq(p, theta).float().to(device) for p in (pt, ph, pw))
    tpos = torch.arange(t, dtype=torch.float32, device=device) + frame_offset
    hpos = torch.arange(h, dtype=torch.float32, device=device)
    wpos = torch.arange(w, dtype=torch.float32, device=device)
    at = (tpos[:, None] * ft[None]).reshape(t, 1, 1, pt).expand(t, h, w, pt)
    ah = (hpos[:, None] * fh[None]).reshape(1, h, 1, ph).expand(t, h, w, ph)
    aw = (wpos[:, None] * fw[None]).reshape(1, 1, w, pw).expand(t, h, w, pw)
    return torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, head_dim // 2)


def rope_cos_sin(
    grid: tuple[int, int, int],
    head_dim: int,
    theta: float = 10000.0,
    frame_offset: int | torch.Tensor = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (N, head_dim), each pair's value repeated in both halves."""
    ang = rope_angles(grid, head_dim, theta, frame_offset, device)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, head_dim) by per-token angles; norms are preserved exactly in exact math."""
    return x * cos + rotate_half(x) * sin


def rope_columns(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """The per-column data behind ``rope_angles`` as numpy fp32 tables, for hosts without torch.

    Returns ``(pos, freq, is_time)``: ``pos`` (N, head_dim/2) the token's index along the axis that
    column rotates with, ``freq`` (head_dim/2,) that column's inverse frequency and ``is_time``
    (head_dim/2,) 1 for time columns. ``rope_angles(grid, d, theta, off)`` equals, in fp32,
    ``(pos + off * is_time) * freq``.
    """
    import numpy as np

    t, h, w = grid
    pt, ph, pw = axis_pairs(head_dim)
    freq = torch.cat([_inv_freq(p, theta).float() for p in (pt, ph, pw)]).numpy()
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    axes = [tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]
    pos = np.concatenate([np.repeat(a[:, None], p, axis=1) for a, p in zip(axes, (pt, ph, pw))], axis=1)
    is_time = np.concatenate([np.ones(pt), np.zeros(ph + pw)])
    return pos.astype(np.float32), freq.astype(np.float32), is_time.astype(np.float32)
