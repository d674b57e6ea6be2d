"""quant/'s own errors, at the bottom of its import graph so every quant module can raise them."""

from __future__ import annotations

from s2dit_deploy.errors import InputError


class CalibrationError(InputError):
    """Calibration data is unusable (NaN / inf), naming where it came from (exit 3: the model or
    its inputs are at fault, not the tool)."""
