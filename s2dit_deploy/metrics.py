"""Fidelity metrics every stage may import (quant's sensitivity, targets' checks, validate, bench).

A leaf of the shared core: numpy only, so measuring an error never pulls in a later pipeline stage.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def psnr(ref: Any, x: Any) -> float:
    """20 log10(max|ref| / rmse); inf when identical (callers that emit JSON must map inf)."""
    ref = np.asarray(ref, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    rmse = math.sqrt(float(np.mean((ref - x) ** 2)))
    peak = float(np.max(np.abs(ref)))
    return math.inf if rmse == 0 else 20 * math.log10(max(peak, 1e-12) / rmse)
