"""QuantPlan -> ExecuTorch ``QnnQuantizer`` (Hexagon HTP), one quantizer config per layer.

HTP runs mixed precision as per-op quantization encodings: every op has an (activation bits,
weight bits) pair from ``QuantDtype`` (8a8w, 8a4w, 16a8w, 16a4w) and QNN inserts the converts
between 8- and 16-bit activations. The translation therefore:

- picks the stage's most common pair as the quantizer default (it also covers the ops no plan
  layer owns: attention matmuls, softmax, norms, residual adds);
- gives every other layer its own ``ModuleQConfig`` through ``set_submodule_qconfig_list``, matched
  on the innermost module path of each node (exactly the plan's layer name, not a prefix);
- keeps weights per output channel (the plan's legal QNN weights are ``int8-pc`` / ``int4-pc``),
  except embedding tables: with per-row encodings on the token embedding's gather, HTP graph
  prepare fails on every layer norm after it ("could not create op", measured on s2dit-small's
  text encoder), so embeddings are quantized per tensor, as QNN's own presets do.

Activation ranges are re-observed by PT2E on the same recorded stream the plan was calibrated on
(``targets/qnn/calibration.py``): QNN's observers produce the encodings its converter expects, so
the plan's ``act_range`` values serve as provenance, not as fixed encodings. ``-mse`` weight
schemes fall back to QNN's min-max per-channel observer (logged), since ``ModuleQConfig`` takes no
weight observer.

Contract (``targets/qnn/lower.py``): ``apply_plan(plan, stage=Stage, soc="SM8750", act_observer=cls)
-> QnnQuantizer``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from .layer_names import bit_pair, layer_of, layer_pairs  # noqa: F401 (bit_pair: public API)
from .layer_names import norm as _norm

log = logging.getLogger(__name__)

_DTYPES = {(8, 8): "use_8a8w", (8, 4): "use_8a4w", (16, 8): "use_16a8w", (16, 4): "use_16a4w"}


def innermost_path(node) -> str | None:
    """The module path (``dit.sandwich.groups.0.high.0.attn.q``) a node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def apply_plan(plan, stage: Any = None, soc: str = "SM8750", act_observer=None):
    """A QnnQuantizer that quantizes each layer of ``stage`` as ``plan`` says."""
    from executorch.backends.qualcomm.quantizer.quantizer import ModuleQConfig, QnnQuantizer, QuantDtype
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset

    from s2dit_deploy.socs import resolve_soc

    plan.check_target("executorch-qnn")
    stage_name = getattr(stage, "name", stage)
    pairs = layer_pairs(plan, stage_name)
    default_pair, _ = Counter(pairs.values()).most_common(1)[0]

    def qconfig(pair: tuple[int, int]) -> ModuleQConfig:  # noqa: E306
        return ModuleQConfig(getattr(QuantDtype, _DTYPES[pair]), is_conv_per_channel=True,
                             is_linear_per_channel=True, is_embedding_per_channel=False, act_observer=act_observer)

    quantizer = QnnQuantizer(soc_model=QcomChipset(resolve_soc(soc).soc_model))
    quantizer.set_default_quant_config(getattr(QuantDtype, _DTYPES[default_pair]), is_conv_per_channel=True,
                                       is_linear_per_channel=True, is_embedding_per_channel=False,
                                       act_observer=act_observer)
    by_norm = {_norm(n): n for n in pairs}
    rules = []
    for pair in sorted(set(pairs.values()) - {default_pair}):
        names = frozenset(n for n, p in pairs.items() if p == pair)

        def predicate(node, names=names) -> bool:
            return layer_of(innermost_path(node), by_norm) in names

        rules.append((predicate, qconfig(pair)))
    quantizer.set_submodule_qconfig_list(rules)
    log.info("qnn %s: %s", stage_name, summary(plan, stage_name))
    return quantizer


def summary(plan, stage_name: str) -> dict[str, Any]:
    """What the translation does to one stage (for the compile report)."""
    pairs = layer_pairs(plan, stage_name)
    default_pair, _ = Counter(pairs.values()).most_common(1)[0]
    return {"plan": plan.name, "stage": stage_name, "default": "%da%dw" % default_pair,
            "layers": dict(Counter("%da%dw" % p for p in pairs.values()))}
