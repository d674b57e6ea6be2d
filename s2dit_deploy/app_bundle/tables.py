"""Constant host-side tables of a bundle: raw little-endian C-order arrays under ``host/tables/``.

Raw arrays with shape and dtype stated in host_loop.json read the same in Swift (``Data``), Kotlin
(``ByteBuffer``), C++ and numpy (``np.fromfile``), with no container format to port. A table holds
what the host feeds a stage that does not depend on the prompt or the noise:

- ``t.<stage>``: one row per timestep value of the nested 1/2/4-step schedules plus the commit
  pass (t = 0), already in the stage's device form (a scalar for CPU targets, the 256-dim
  sinusoidal features or the folded one-hot for Core ML), so the app indexes a row per call.
- ``rope.<grid>.pos`` / ``.freq`` / ``.is_time``: the columns of the 3-D RoPE
  (``model_zoo.rope.rope_columns``); angles at a chunk's frame offset are
  ``(pos + offset * is_time) * freq`` in fp32, exact at any stream position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..model_zoo.config import ModelConfig
from ..model_zoo.rope import rope_columns
from ..model_zoo.sampler import SUPPORTED_STEPS, FewStepSchedule
from ..rewrites.device_io import IOMap, sinusoidal_features
from ..stages import rope_grids

TABLE_DIR = "host/tables"
COMMIT_T = 0.0


def write_table(root: Path, name: str, array: np.ndarray) -> dict[str, Any]:
    """``root/host/tables/<name>.bin``; the host_loop.json entry (file, dtype, shape, bytes)."""
    arr = np.ascontiguousarray(array)
    rel = f"{TABLE_DIR}/{name}.bin"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(path)
    return {"file": rel, "dtype": str(arr.dtype), "shape": list(arr.shape), "bytes": int(arr.nbytes)}


def timestep_rows() -> tuple[list[float], dict[str, list[int]], int]:
    """(t value of each row, rows of each supported step count in call order, the commit row).

    The nested schedules share values, so one row list serves 1, 2 and 4 steps. The schedule is
    the pipeline's (``FewStepSchedule`` defaults), whatever the model."""
    values: list[float] = []
    rows: dict[str, list[int]] = {}
    for steps in SUPPORTED_STEPS:
        idx = []
        for t in FewStepSchedule(steps=steps).timesteps:
            hit = next((i for i, v in enumerate(values) if abs(v - t) <= 1e-12), None)
            if hit is None:
                values.append(float(t))
                hit = len(values) - 1
            idx.append(hit)
        rows[str(steps)] = idx
    values.append(COMMIT_T)
    return values, rows, len(values) - 1


def t_table(m: IOMap, values: list[float]) -> tuple[np.ndarray, list[int]]:
    """Rows of the ``t`` input in device form, and the rows the device cannot take (folded one-hot
    schedules hold only their own values; those rows are zero and listed)."""
    vals = np.asarray(values, dtype=np.float32)
    if m.sinusoidal is not None:
        feats = sinusoidal_features(vals, m.sinusoidal)
        return feats.reshape(len(values), *m.device_shape).astype(np.float32), []
    if m.onehot is not None:
        out = np.zeros((len(values), *m.device_shape), dtype=np.float32)
        missing = []
        for r, v in enumerate(values):
            hit = np.flatnonzero(np.abs(np.asarray(m.onehot) - v) <= 1e-6)
            if hit.size:
                out[r].reshape(-1)[hit[0]] = 1.0
            else:
                missing.append(r)
        return out, missing
    return vals.reshape(len(values), *m.host_shape), []


def rope_tables(config: ModelConfig) -> dict[str, np.ndarray]:
    """``rope.<grid>.pos|freq|is_time`` for the chunk's hi and lo token grids."""
    d = config.dit
    out = {}
    for grid_name, grid in rope_grids(config).items():
        pos, freq, is_time = rope_columns(grid, d.head_dim, d.rope_theta)
        out.update({f"rope.{grid_name}.pos": pos, f"rope.{grid_name}.freq": freq,
                    f"rope.{grid_name}.is_time": is_time})
    return out
