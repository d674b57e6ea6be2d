"""Quantization schemes for the XNNPACK target, applied before ``torch.export`` of a stage.

- ``none``: fp32.
- ``int8``: PT2E static int8, per-channel symmetric weights (``XNNPACKQuantizer`` with
  ``get_symmetric_quantization_config(is_per_channel=True)``), activations calibrated on real
  stage inputs (``s2dit_deploy.fidelity.record_inputs`` of a float streaming run).
- ``int8-dynamic``: PT2E int8 weights per channel, activations quantized per call at run time.
- ``8da4w``: torchao ``Int8DynamicActivationIntxWeightConfig`` (int4 weights, group 32, int8
  dynamic activations) on every Linear whose input width is a multiple of the group.

A ``QuantPlan`` from ``s2dit_deploy.quant`` is translated by ``s2dit_deploy.quant.xnnpack.apply_plan``
(the quantizer's module); this file only dispatches to it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

SCHEMES = ("none", "int8", "int8-dynamic", "8da4w")
GROUP_SIZE = 32


class QuantSchemeError(ValueError):
    """An unknown scheme, or a plan that cannot be applied here."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise QuantSchemeError(f"unknown xnnpack_quant {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def _calibrate(module: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> None:
    with torch.no_grad():
        for args in batches:
            module(*args)


def _pt2e(module: nn.Module, example: tuple, batches: Sequence[tuple], dynamic: bool) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .passes import LinearLayerNorm

    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    # the layer norms' mean/variance GEMMs stay fp32 (inside the XNNPACK delegate)
    quantizer.set_module_type(LinearLayerNorm, None)
    from .passes import export_for_xnnpack

    graph = export_for_xnnpack(module, example).module()
    prepared = prepare_pt2e(graph, quantizer)
    _calibrate(prepared, batches if not dynamic else batches[:1])
    return convert_pt2e(prepared)


def _8da4w(module: nn.Module) -> tuple[nn.Module, int, int]:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    eligible = [m for m in linears if m.in_features % GROUP_SIZE == 0]
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE))
    quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE == 0)
    return module, len(eligible), len(linears)


def quantize_module(module: nn.Module, scheme: str, example: tuple, batches: Sequence[tuple]
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """The module to export for ``scheme`` and a summary for the artifact's ``quant`` field."""
    check_scheme(scheme)
    if scheme == "none":
        return module, {"scheme": "none", "weights": "fp32", "activations": "fp32"}
    if scheme in ("int8", "int8-dynamic"):
        dynamic = scheme == "int8-dynamic"
        if not dynamic and not batches:
            raise QuantSchemeError("int8 static quantization needs calibration inputs")
        swapped = 0
        if not dynamic:  # the -3e4 slot mask would own the 8-bit range of the scores (module copy: swap_conv3d)
            from ..explicit_attention import explicit_attention

            swapped = explicit_attention(module)
        q = _pt2e(module, example, batches, dynamic)
        return q, {
            "scheme": scheme, "flow": "pt2e", "quantizer": "XNNPACKQuantizer",
            "weights": "int8 symmetric per-channel",
            "activations": "int8 dynamic per-call" if dynamic else "int8 static (calibrated)",
            "calibration_batches": 0 if dynamic else len(batches), "fp32_layers": "layer norms",
            "explicit_attention": swapped,
        }
    q, n_q, n_all = _8da4w(module)
    return q, {
        "scheme": "8da4w", "flow": "torchao quantize_", "weights": f"int4 symmetric, group {GROUP_SIZE}",
        "activations": "int8 dynamic per-token", "linears_quantized": n_q, "linears_total": n_all,
        "note": "Linear layers only; other ops stay fp32",
    }


def apply_quant_plan(plan: Any, stage, module: nn.Module, example: tuple, batches: Sequence[tuple]
                     ) -> tuple[nn.Module, dict[str, Any]]:
    """Hand a QuantPlan to the quantizer's XNNPACK translation (``s2dit_deploy.quant.xnnpack``).

    Contract: ``apply_plan(plan, stage_name, module, example_inputs, calibration_batches)`` returns
    ``(module ready for torch.export, quant summary dict)``.
    """
    try:
        mod = importlib.import_module("s2dit_deploy.quant.xnnpack")
    except ModuleNotFoundError as exc:
        if exc.name != "s2dit_deploy.quant.xnnpack":
            raise
        raise QuantSchemeError(
            "a QuantPlan was given but s2dit_deploy.quant.xnnpack (the plan -> XNNPACK translation) does not "
            "exist in this version; compile without a plan and pick a scheme with "
            f"xnnpack_quant={'|'.join(SCHEMES)}") from exc
    return mod.apply_plan(plan, stage.name, module, example, batches)
