"""quant/'s own errors, at the bottom of its import graph so every quant module can raise them."""

from __future__ import annotations

from s2dit_deploy.errors import InputError, UsageError


class CalibrationError(InputError):
    """Calibration data is unusable (NaN / inf), naming where it came from (exit 3: the model or
    its inputs are at fault, not the tool)."""


class CalibrationConfigError(UsageError):
    """A calibration setting is out of range; the message names it (exit 2)."""


class PlanMismatchError(InputError):
    """A plan made for other weights, another model or another resolution (exit 3)."""


class RoundedWeightsError(InputError):
    """A plan's rounded-weights sidecar is missing, altered, or does not fit the model (exit 3)."""
