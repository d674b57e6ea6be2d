"""QuantPlan -> coreai-opt: per-layer weight compression and int8 activations for one Core AI program.

Everything quantized here is done by Apple's coreai-opt, finalized for Core AI
(``ExportBackend.CoreAI``), so the ``.aimodel`` stores real int8 / int4 / LUT constants feeding
``coreai.constexpr_blockwise_shift_scale`` / ``lut_to_dense`` and ``coreai.quantize`` /
``dequantize`` around activations:
- linear weights (``int8-pc``, ``int4-pc``, ``int4-b32``): ``Quantizer`` with a per-layer
  ``ModuleQuantizerConfig`` (symmetric; per output channel, or 32-wide blocks along the input);
- palettized weights (``lut2`` .. ``lut6``): ``KMeansPalettizer`` (per-tensor k-means), then the
  quantizer for the activations;
- int8 activations: per-tensor asymmetric on the layer's input, with ``float_range`` set to the
  plan's calibrated range and the ``static`` calculator, so a plan means the same ranges here as on
  Core ML, and calibration needs one forward of the example inputs only.
``-mse`` schemes clip each channel to the plan's MSE-optimal range before coreai-opt's min-max
scale (the same clip the Core ML translation applies; coreai-opt has no MSE weight range).

What coreai-opt cannot express is refused before any work (``check_plan_expressible``): 16-bit
and dynamic activations (its Core AI finalize takes 8-bit static ones only) and per-block weights
whose input size is not a multiple of the block (it would skip the layer with a warning).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from s2dit_deploy.errors import InputError
from s2dit_deploy.quant.layer_names import layer_of, norm
from s2dit_deploy.quant.observers import weight_scale
from s2dit_deploy.quant.schemes import act_scheme, fits, weight_scheme

log = logging.getLogger(__name__)

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class PlanNotExpressible(InputError):
    """A plan layer's scheme has no coreai-opt equivalent (named with the layer)."""


def _problem(lq) -> str | None:
    ws, a = weight_scheme(lq.weight), act_scheme(lq.act)
    if a.dynamic:
        return f"activation {lq.act}: coreai-opt's Core AI export takes no dynamic (per-call) quantization"
    if not a.is_float and a.bits != 8:
        return f"activation {lq.act}: coreai-opt exports 8-bit activations only to Core AI"
    if not a.is_float and lq.act_range is None:
        return f"activation {lq.act} without a calibrated range (act_range)"
    if ws.kind == "lut" and ws.bits not in (1, 2, 3, 4, 6, 8):
        return f"weight {lq.weight}: coreai-opt palettizes to 1, 2, 3, 4, 6 or 8 bits"
    return None


def check_plan_expressible(plan, stages: tuple[str, ...]) -> None:
    """Raise PlanNotExpressible naming the first layers coreai-opt cannot build (before any work)."""
    bad = [f"{s}:{n} ({msg})" for s in stages for n, lq in plan.stages.get(s, {}).items()
           if (msg := _problem(lq)) is not None]
    if bad:
        raise PlanNotExpressible(f"plan {plan.name!r} has layers coreai-opt cannot express for Core AI: "
                                 f"{'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")


def _weight_spec(ws):
    from coreai_opt.quantization.spec import PerBlockGranularity, PerChannelGranularity, QuantizationSpec

    dtype = {8: torch.int8, 4: torch.int4}[ws.bits]
    gran = (PerBlockGranularity(axis=1, block_size=ws.block) if ws.granularity == "block"
            else PerChannelGranularity(axis=0))
    return QuantizationSpec(dtype=dtype, qscheme="symmetric", granularity=gran)


def _act_spec(lo: float, hi: float):
    from coreai_opt.quantization.spec import PerTensorGranularity, QuantizationSpec

    return QuantizationSpec(dtype=torch.int8, qscheme="asymmetric", granularity=PerTensorGranularity(),
                            qparam_calculator_cls="static", float_range=[min(lo, 0.0), max(hi, 0.0)])


def layer_modules(module: nn.Module, layers: list[str]) -> dict[str, str]:
    """Module path in the program module -> plan layer, for every weighted module a layer owns
    (the ANE rewrite keeps a layer's path as a suffix, also when it splits it into children)."""
    by_norm = {norm(n): n for n in layers}
    out = {}
    for path, m in module.named_modules():
        if isinstance(m, WEIGHTED) and isinstance(getattr(m, "weight", None), torch.Tensor):
            layer = layer_of(path, by_norm)
            if layer is not None:
                out[path] = layer
    return out


def _exact(path: str) -> str:
    return "^" + re.escape(path) + "$"  # coreai-opt matches module names as regexes


def compress(module: nn.Module, examples: tuple[torch.Tensor, ...], plan, stage_name: str
             ) -> tuple[nn.Module, dict[str, Any]]:
    """``module`` (a private copy: weights may be clipped in place) compressed as ``plan`` says for
    ``stage_name``; returns the finalized module and the quant summary the artifact records."""
    from coreai_opt import ExportBackend
    from coreai_opt.palettization import KMeansPalettizer, KMeansPalettizerConfig, ModuleKMeansPalettizerConfig
    from coreai_opt.palettization import PalettizationSpec
    from coreai_opt.quantization import ModuleQuantizerConfig, Quantizer, QuantizerConfig

    layers = dict(plan.stages.get(stage_name, {}))
    summary: dict[str, Any] = {"plan": plan.name, "stage": stage_name, "layer_weights": {}, "weights": {},
                               "act_quantized": [], "clipped": [], "unmatched_layers": [],
                               "library": "coreai-opt (ExportBackend.CoreAI)"}
    owned = layer_modules(module, list(layers))
    # A plan layer whose weight the ANE rewrite moved into a module coreai-opt cannot quantize (the
    # LCHA local depthwise conv becomes banded w_cur / w_past tensors of CausalDepthwiseTimeConv)
    # stays fp16, and the artifact says so with the reason. A plan layer the program does not hold at
    # all stays in unmatched_layers, which check_plan reports as a mismatch (the compile fails).
    by_norm = {norm(n): n for n in layers}
    held_elsewhere = {layer_of(path, by_norm) for path, m in module.named_modules()
                      if not isinstance(m, WEIGHTED) and any(True for _ in m.parameters(recurse=False))}
    missing = set(layers) - set(owned.values())
    unreached = sorted(n for n in missing & held_elsewhere if layers[n].weight != "fp16" or layers[n].act != "float")
    summary["kept_float"] = {n: "the ANE rewrite holds this weight outside a Linear/Conv module, which "
                                "coreai-opt's quantizer cannot reach (compile with rewrite=false to quantize it)"
                             for n in unreached}
    summary["unmatched_layers"] = sorted(missing - set(unreached))
    if unreached:
        log.warning("coreai %s: %d plan layers stay fp16: the rewrite put their weights out of coreai-opt's "
                    "reach (e.g. %s)", stage_name, len(unreached), unreached[:3])
    mods = dict(module.named_modules())
    luts, quant = {}, {}
    for path, layer in owned.items():
        lq, m = layers[layer], mods[path]
        ws = weight_scheme(lq.weight)
        a = act_scheme(lq.act)
        if ws.kind == "linear" and not fits(lq.weight, tuple(m.weight.shape)):
            raise PlanNotExpressible(f"{stage_name}:{layer}: {lq.weight} needs an input size that is a multiple "
                                     f"of {ws.block}; {path} has weight {tuple(m.weight.shape)}")
        if ws.kind == "linear" and ws.rounding == "nearest" and ws.range_method == "mse":
            with torch.no_grad():  # clip to the MSE-optimal range: coreai-opt's min-max scale then equals it
                clip = weight_scale(m.weight.float(), ws) * ((1 << (ws.bits - 1)) - 1)
                m.weight.copy_(torch.maximum(torch.minimum(m.weight.float(), clip), -clip).to(m.weight.dtype))
            summary["clipped"].append(path)
        state = None
        if ws.kind == "linear":
            state = {"weight": _weight_spec(ws)}
        elif ws.kind == "lut":
            luts[_exact(path)] = ModuleKMeansPalettizerConfig(
                op_state_spec={"weight": PalettizationSpec(n_bits=ws.bits)})
        act_in = None if a.is_float or isinstance(m, nn.Embedding) else {0: _act_spec(*lq.act_range)}
        if state is not None or act_in is not None:
            quant[_exact(path)] = ModuleQuantizerConfig(op_input_spec=act_in, op_output_spec=None,
                                                        op_state_spec=state)
        if act_in is not None:
            summary["act_quantized"].append(path)
        summary["weights"][path] = lq.weight
        summary["layer_weights"][layer] = lq.weight
    if luts:
        pal = KMeansPalettizer(module, KMeansPalettizerConfig(global_config=None, module_name_configs=luts))
        pal.prepare(examples)
        module = pal.finalize(backend=ExportBackend.CoreAI)
        module.eval()  # graph-mode eval() returns None (an FX rewrite of dropout / batchnorm)
    if quant:
        q = Quantizer(module, QuantizerConfig(global_config=None, module_name_configs=quant))
        prepared = q.prepare(examples)
        prepared.eval()  # the graph-mode export carries train-mode dropout otherwise
        with torch.no_grad(), q.calibration_mode():  # qparams from float_range: one forward sets them
            prepared(*examples)
        module = q.finalize(backend=ExportBackend.CoreAI)
        module.eval()
    counts: dict[str, int] = {}
    for w in summary["weights"].values():
        counts[w] = counts.get(w, 0) + 1
    for n in unreached:
        summary["layer_weights"][n] = "fp16"
        counts["fp16 (kept)"] = counts.get("fp16 (kept)", 0) + 1
    summary["counts"] = counts
    log.info("coreai %s: %d weights compressed (%s), %d inputs at int8", stage_name, len(summary["weights"]),
             counts, len(summary["act_quantized"]))
    return module, summary
