"""Lower one stage to an ExecuTorch ``.pte`` delegated to QNN HTP (fp16 or PT2E-quantized).

Numbers the caller needs come back in :class:`Lowered`: the program bytes, the partition report
(ops delegated / total, each op left outside QNN with the partitioner's reason and the QNN
backend's own validation messages), and what was quantized.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from s2dit_deploy.socs import resolve_soc as resolve_soc_name

from .libs import classify_native, ensure_qnn, interposer_handle
from .rewrite import apply_host_inputs, rewrite_for_qnn

log = logging.getLogger(__name__)

# precision preset -> QuantDtype member (per-channel weights). Per-block weights (16a4w_block, LPBQ)
# need per-node block sizes, so they come only from a QuantPlan through s2dit_deploy.quant.qnn.
PRECISIONS: dict[str, str | None] = {
    "fp16": None, "8a8w": "use_8a8w", "16a8w": "use_16a8w", "16a16w": "use_16a16w",
    "16a4w": "use_16a4w", "8a4w": "use_8a4w",
}
_PARTITIONER_LOGGER = "executorch.backends.qualcomm.partition.qnn_partitioner"
_SKIP_TARGETS = {"getitem", "executorch_call_delegate"}


def supported_socs() -> list[str]:
    from executorch.backends.qualcomm.utils.utils import get_soc_to_chipset_map

    return sorted(get_soc_to_chipset_map())


def resolve_soc(soc: str):
    """'SM8750' -> QcomChipset; a clear error naming the SoCs this ExecuTorch knows."""
    from executorch.backends.qualcomm.utils.utils import get_soc_to_chipset_map

    table = get_soc_to_chipset_map()
    key = resolve_soc_name(soc).name  # UsageError naming --soc and the valid SoCs
    return table[key]


def htp_arch(soc: str) -> int:
    from executorch.backends.qualcomm.utils.utils import get_soc_to_htp_arch_map

    return int(get_soc_to_htp_arch_map()[resolve_soc_name(soc).name])


def htp_spec_args(precision: str, plan: Any = None) -> dict[str, bool]:
    """Arguments of ``generate_htp_compiler_spec``: fp16 only for a float graph, never a quantized one."""
    quantized = plan is not None or precision != "fp16"
    return {"use_fp16": not quantized}


def compiler_specs(soc: str, precision: str, profile: bool = False, plan: Any = None) -> list:
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    backend = generate_htp_compiler_spec(**htp_spec_args(precision, plan))
    return generate_qnn_executorch_compiler_spec(resolve_soc(soc), backend, profile_level=2 if profile else 0)


@contextlib.contextmanager
def native_output(sink: list[str]) -> Iterator[None]:
    """Capture what native code writes to fds 1/2 (QNN logs) into ``sink`` (one line each)."""
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = [os.dup(1), os.dup(2)]
        libc.fflush(None)
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines = [line for line in text.splitlines() if line.strip()]
            sink.extend(lines)
            for line in lines:  # known-harmless or not, the caller decides what to surface
                log.debug("native: %s", line)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class QnnCompileError(RuntimeError):
    """QNN could not build an HTP graph for a stage (the message says why and what to do)."""


@dataclass
class Lowered:
    program: bytes
    partition: dict[str, Any]
    quant: dict[str, Any] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)
    host_inputs: dict[str, Any] = field(default_factory=dict)


ACT_OBSERVERS = ("minmax", "moving_average", "histogram")


def act_observer_class(name: str = "minmax"):
    """Activation observer for QNN's PT2E configs.

    ``minmax`` (our default) takes the range over every recorded call. QNN's own default,
    ``moving_average`` (MovingAverageMinMaxObserver, constant 0.01), barely moves after the first
    call, and a recorded stream starts with the noisiest step (t = 1, empty cache), so later steps
    get clipped. ``histogram`` picks the range that minimizes the quantization error (slower).
    """
    from torchao.quantization.pt2e.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
    )

    table = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
             "histogram": HistogramObserver}
    if name not in table:
        raise ValueError(f"unknown act_observer {name!r}; choose from {', '.join(ACT_OBSERVERS)}")
    return table[name]


def make_quantizer(precision: str, soc: str, plan: Any = None, stage: Any = None, act_observer: str = "minmax"):
    """QnnQuantizer for a precision preset, or translated from a QuantPlan by the quant package."""
    observer = act_observer_class(act_observer)
    if plan is not None:
        from s2dit_deploy.quant import qnn as quant_qnn

        return quant_qnn.apply_plan(plan, stage=stage, soc=soc, act_observer=observer)
    from executorch.backends.qualcomm.quantizer.quantizer import (
        QnnQuantizer,
        QuantDtype,
    )

    quantizer = QnnQuantizer(soc_model=resolve_soc(soc))
    quantizer.set_default_quant_config(getattr(QuantDtype, PRECISIONS[precision]),
                                       is_conv_per_channel=True, is_linear_per_channel=True,
                                       act_observer=observer)
    return quantizer


def quantize(module: torch.nn.Module, example: tuple, calibration: Sequence[tuple], quantizer):
    """PT2E: export, prepare, run the calibration inputs, convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = torch.export.export(module, example, strict=True).module()
    prepared = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for args in calibration:
            prepared(*args)
    return convert_pt2e(prepared)


def _count_ops(graph: torch.fx.Graph) -> Counter:
    return Counter(getattr(n.target, "__name__", str(n.target)) for n in graph.nodes
                   if n.op == "call_function"
                   and getattr(n.target, "__name__", str(n.target)) not in _SKIP_TARGETS)


def partition_report(edge_manager, partitioner_log: list[str], native: list[str]) -> dict[str, Any]:
    """Delegated / total op counts and every op left outside QNN with its reason."""
    gm = edge_manager.exported_program().graph_module
    delegated: Counter = Counter()
    subgraphs = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("lowered_module"):
            lowered = getattr(gm, node.target)
            delegated += _count_ops(lowered.original_module.graph)
            subgraphs += 1
    fallback = _count_ops(gm.graph)
    reasons: dict[str, list[str]] = {}
    for msg in partitioner_log:
        m = re.match(r"\[[^\]]+\]\s+(\S+)\s+\|\s+(.*)", msg)
        if m and m.group(2) != "True" and m.group(2) != "Forced Passed":
            reasons.setdefault(m.group(1), [])
            if m.group(2) not in reasons[m.group(1)]:
                reasons[m.group(1)].append(m.group(2))
    real, harmless = classify_native(native)
    qnn_msgs = sorted({line.strip() for line in real if "<E>" in line or "<W>" in line or "[ERROR]" in line})
    total = sum(delegated.values()) + sum(fallback.values())
    return {
        "delegated_ops": sum(delegated.values()),
        "total_ops": total,
        "delegated_fraction": round(sum(delegated.values()) / total, 4) if total else 1.0,
        "qnn_subgraphs": subgraphs,
        "delegated_by_op": dict(sorted(delegated.items())),
        "fallbacks": [{"op": op, "count": n,
                       "reason": "; ".join(reasons.get(op, []))
                       or "not claimed by the QNN partitioner (see qnn_messages)"}
                      for op, n in sorted(fallback.items())],
        "qnn_messages": qnn_msgs[:50],
        "qnn_harmless_messages": sorted({(h["message"], h["reason"]) for h in harmless})[:20],
    }


def lower(module: torch.nn.Module, example: tuple, input_names: list[str], soc: str, precision: str = "fp16",
          plan: Any = None, calibration: Sequence[tuple] | None = None, profile: bool = False,
          stage: Any = None, act_observer: str = "minmax") -> Lowered:
    """Rewrite, (quantize,) partition to QNN and serialize a ``.pte``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown QNN precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    resolve_soc(soc)
    ensure_qnn()
    from executorch.backends.qualcomm.utils.utils import (
        to_edge_transform_and_lower_to_qnn,
    )

    module, example, rewrites, host = rewrite_for_qnn(module, example, input_names)
    if calibration and host:
        calibration = [tuple(apply_host_inputs(host, dict(zip(input_names, args))).values())
                       for args in calibration]
    spec_args = htp_spec_args(precision, plan)
    quant: dict[str, Any] = {"precision": "fp16" if spec_args["use_fp16"] else "quantized",
                             "preset": precision if precision != "fp16" and plan is None else None,
                             "use_fp16": spec_args["use_fp16"], "soc": soc.upper()}
    if precision != "fp16" or plan is not None:
        if not calibration:
            raise ValueError("quantized QNN compile needs calibration inputs (recorded stage inputs)")
        module = quantize(module, example, calibration, make_quantizer(precision, soc, plan, stage, act_observer))
        quant.update({"scheme": "pt2e-qnn", "per_channel": True, "calibration_samples": len(calibration),
                      "act_observer": act_observer,
                      "plan": getattr(plan, "name", None) if plan is not None else None})
        if plan is not None:
            from s2dit_deploy.quant import qnn as quant_qnn

            quant["translation"] = quant_qnn.summary(plan, getattr(stage, "name", stage))
    specs = compiler_specs(soc, precision, profile, plan)
    records, native = _Records(), []
    plog = logging.getLogger(_PARTITIONER_LOGGER)
    plog.addHandler(records)
    try:
        with native_output(native):
            edge = to_edge_transform_and_lower_to_qnn(module, example, specs)
        report = partition_report(edge, records.messages, native)
        program = edge.to_executorch()
    except Exception as exc:
        log.error("QNN lowering failed; last QNN messages:\n%s", "\n".join(classify_native(native)[0][-40:]))
        tcm = [line.split("<E>")[-1].strip() for line in native if "fit in TCM" in line]
        if tcm:
            raise QnnCompileError(
                f"HTP cannot tile an op of this graph into its on-chip memory (TCM): {tcm[0]}. The graph's "
                "activations are too large for one HTP graph at this resolution; compile this stage for "
                "another target (e.g. executorch-xnnpack on the CPU) or at a lower resolution") from exc
        raise
    finally:
        plog.removeHandler(records)
    handle = interposer_handle()
    if handle is not None:
        handle.s2dit_qnn_compat_repacked.restype = ctypes.c_ulong
        report["htp_configs_repacked"] = int(handle.s2dit_qnn_compat_repacked())
    for fb in report["fallbacks"]:
        log.warning("QNN fallback: %s x%d: %s", fb["op"], fb["count"], fb["reason"])
    return Lowered(bytes(program.buffer), report, quant, rewrites, host)
