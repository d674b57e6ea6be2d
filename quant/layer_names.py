"""Plan layer names <-> graph names, shared by every backend translation (Core ML, QNN, ONNX).

Each toolchain spells a module path differently (``p_dit_blocks_0_q_weight`` in MIL, an
``nn_module_stack`` path in PT2E, ``/dit/blocks.0/q/MatMul`` in ONNX); all are compared on one
normalized form here, so the translations do not import each other's internals.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from .schemes import act_scheme, weight_scheme

log = logging.getLogger(__name__)


def norm(name: str) -> str:
    """A name with every run of non-alphanumerics turned into one ``_`` (``a.b/c`` -> ``a_b_c``)."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_")


def spellings(layer: str) -> list[str]:
    """The underscored names a plan layer's weight can carry in a converted graph: its own path, and
    for a causal Conv3d (``x.conv``) the per-time taps the ANE decoder rewrite splits it into
    (``rewrites/ane_decoder.py``: ``x.taps.0``, ``x.taps.1``, ...)."""
    out = [norm(layer)]
    if layer.endswith(".conv"):
        out.append(norm(layer[: -len(".conv")]) + "_taps")
    return out


def match_layer(const_name: str, layers: list[str]) -> str | None:
    """Plan layer owning a weight const (longest ``_``-bounded occurrence of one of its spellings)."""
    cn = "_" + norm(const_name) + "_"
    best, best_len = None, -1
    for layer in layers:
        for spelled in spellings(layer):
            if "_" + spelled + "_" in cn and len(spelled) > best_len:
                best, best_len = layer, len(spelled)
    return best


def layer_of(path: str | None, layers_by_norm: Mapping[str, str]) -> str | None:
    """Plan layer owning a module path: the layer whose name is a ``.``-bounded suffix of the path
    or of one of its ancestors (a rewrite may split a layer into children, e.g. ``local.taps.0``)."""
    if not path:
        return None
    parts = path.split(".")
    for end in range(len(parts), 0, -1):  # the module itself, then its ancestors
        for start in range(end):  # longest suffix first
            hit = layers_by_norm.get(norm(".".join(parts[start:end])))
            if hit is not None:
                return hit
    return None


def bit_pair(weight: str, act: str, allow_float_act: bool = False) -> tuple[int, int]:
    """(activation bits, weight bits) of a plan layer, as QNN's QuantDtype names them (0 bits:
    float activations, which only ``allow_float_act`` callers such as ONNX QDQ on CPU accept)."""
    ws, a = weight_scheme(weight), act_scheme(act)
    if ws.kind != "linear" or ws.granularity != "channel":
        raise ValueError(f"QNN / ONNX QDQ take per-channel int8/int4 weights, not {weight!r}")
    if a.dynamic or (a.is_float and not allow_float_act):
        raise ValueError(f"QNN / ONNX QDQ need static int8/int16 activations, not {act!r}")
    return a.bits, ws.bits


def layer_pairs(plan, stage_name: str, allow_float_act: bool = False) -> dict[str, tuple[int, int]]:
    """(activation bits, weight bits) of every plan layer of one stage."""
    layers = plan.stages.get(stage_name, {})
    if not layers:
        raise ValueError(f"plan {plan.name!r} has no layers for stage {stage_name!r}")
    mse = [n for n, lq in layers.items() if weight_scheme(lq.weight).range_method == "mse"
           and weight_scheme(lq.weight).rounding == "nearest"]
    if mse:
        log.info("%s: %d -mse weight schemes use the min-max per-channel observer", stage_name, len(mse))
    pairs = {}
    pairs = {}
    for name, lq in layers.items():
        try:
            pairs[name] = bit_pair(lq.weight, lq.act, allow_float_act)
        except ValueError as exc:
            raise ValueError(f"{stage_name}:{name}: {exc}") from exc
    return pairs

