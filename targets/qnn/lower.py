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
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from s2dit_deploy.socs import resolve_soc as resolve_soc_name

from .decompose import decompose_for_qnn
from .libs import classify_native, ensure_qnn, interposer_handle
from .partition import NO_BUILDER_REASON, lower_to_edge, rejected_kept_ops
from .placement import placement_report, qnn_node_messages
from .rewrite import apply_host_inputs, rewrite_for_qnn

log = logging.getLogger(__name__)

# precision preset -> QuantDtype member (per-channel weights). Per-block weights (16a4w_block, LPBQ)
# need per-node block sizes, so they come only from a QuantPlan through s2dit_deploy.quant.qnn.
PRECISIONS: dict[str, str | None] = {
    "fp16": None, "8a8w": "use_8a8w", "16a8w": "use_16a8w", "16a16w": "use_16a16w",
    "16a4w": "use_16a4w", "8a4w": "use_8a4w",
}
_PARTITIONER_LOGGER = "executorch.backends.qualcomm.partition.qnn_partitioner"
_XNNPACK_WHY_LOGGER = "executorch.backends.xnnpack.partition.config.xnnpack_config"  # WhyNoPartition, debug


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
    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _listen(name: str, level: int = logging.INFO) -> Iterator[_Records]:
    """Collect a library logger's messages at ``level`` (its level is restored afterwards)."""
    logger, records = logging.getLogger(name), _Records(level)
    saved = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(saved)


class QnnCompileError(RuntimeError):
    """QNN could not build an HTP graph for a stage (the message says why and what to do)."""


@dataclass
class Lowered:
    program: bytes
    partition: dict[str, Any]
    quant: dict[str, Any] = field(default_factory=dict)
    rewrites: dict[str, int] = field(default_factory=dict)
    host_inputs: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)


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


def quantize(module: torch.nn.Module, example: tuple, calibration: Sequence[tuple], quantizer,
             decompose: Sequence[str] = ()) -> tuple[torch.fx.GraphModule, dict[str, int]]:
    """PT2E: export, decompose (what QNN has no builder for, and the ``decompose`` ops), prepare,
    run the calibration inputs, convert. Returns the converted module and the decomposed counts."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    ep, counts = decompose_for_qnn(torch.export.export(module, example, strict=True), decompose)
    prepared = prepare_pt2e(ep.module(), quantizer)
    with torch.no_grad():
        for args in calibration:
            prepared(*args)
    return convert_pt2e(prepared), counts


def partition_report(edge_manager, partitioner_log: list[str], native: list[str],
                     decomposed: dict[str, dict[str, Any]] | None = None, xnnpack_log: Sequence[str] = ()
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Delegated / total op counts with every op left outside QNN and its reason, the placement)."""
    placement = placement_report(edge_manager, partitioner_log, native, decomposed, xnnpack_log)
    delegated = placement["ops"]["htp"]
    total = sum(placement["ops"].values())
    real, harmless = classify_native(native)
    qnn_msgs = sorted({line.strip() for line in real if "<E>" in line or "<W>" in line or "[ERROR]" in line})
    return {
        "delegated_ops": delegated,
        "total_ops": total,
        "delegated_fraction": placement["op_share_accelerator"],
        "qnn_subgraphs": placement["subgraphs"]["htp"],
        "delegated_by_op": placement.pop("htp_by_op"),
        "fallbacks": placement["fallbacks"],
        "qnn_messages": qnn_msgs[:50],
        "qnn_harmless_messages": sorted({(h["message"], h["reason"]) for h in harmless})[:20],
    }, placement


def lower(module: torch.nn.Module, example: tuple, input_names: list[str], soc: str, precision: str = "fp16",
          plan: Any = None, calibration: Sequence[tuple] | None = None, profile: bool = False,
          stage: Any = None, act_observer: str = "minmax", fallback: bool = True) -> Lowered:
    """Rewrite, (quantize,) partition to QNN (then XNNPACK unless ``fallback=False``; portable
    kernels run the rest) and serialize a ``.pte``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown QNN precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    resolve_soc(soc)
    ensure_qnn()
    module, example, rewrites, host = rewrite_for_qnn(module, example, input_names)
    if calibration and host:
        calibration = [tuple(apply_host_inputs(host, dict(zip(input_names, args))).values())
                       for args in calibration]
    spec_args = htp_spec_args(precision, plan)
    quant: dict[str, Any] = {"precision": "fp16" if spec_args["use_fp16"] else "quantized",
                             "preset": precision if precision != "fp16" and plan is None else None,
                             "use_fp16": spec_args["use_fp16"], "soc": soc.upper()}
    native: list[str] = []
    pre_decomposed: dict[str, dict[str, Any]] = {}
    if precision != "fp16" or plan is not None:
        if not calibration:
            raise ValueError("quantized QNN compile needs calibration inputs (recorded stage inputs)")
        # kept ops HTP rejects (probed on the float graph) are decomposed before PT2E annotates them
        with native_output(native):
            pre_decomposed = rejected_kept_ops(module, example, compiler_specs(soc, "fp16"))
        if pre_decomposed:
            log.info("decomposed before quantization (QNN rejects them as one op): %s",
                     {op: e["count"] for op, e in pre_decomposed.items()})
        module, counts = quantize(module, example, calibration,
                                  make_quantizer(precision, soc, plan, stage, act_observer),
                                  decompose=sorted(pre_decomposed))
        for op, n in counts.items():
            pre_decomposed.setdefault(op, {"count": n, "nodes": [], "reason": NO_BUILDER_REASON})
        quant.update({"scheme": "pt2e-qnn", "per_channel": True, "calibration_samples": len(calibration),
                      "act_observer": act_observer,
                      "plan": getattr(plan, "name", None) if plan is not None else None})
        if plan is not None:
            from s2dit_deploy.quant import qnn as quant_qnn

            quant["translation"] = quant_qnn.summary(plan, getattr(stage, "name", stage))
    specs = compiler_specs(soc, precision, profile, plan)
    try:
        with native_output(native), _listen(_PARTITIONER_LOGGER) as records, \
                _listen(_XNNPACK_WHY_LOGGER, logging.DEBUG) as xnn_why:
            edge, decomposed = lower_to_edge(module, example, specs, fallback=fallback)
        decomposed = {**pre_decomposed, **decomposed}
        messages = qnn_node_messages(native)
        for entry in decomposed.values():
            why = sorted({m for n in entry["nodes"] for m in messages.get(n, [])})
            if why:
                entry["reason"] += f" (QNN: {'; '.join(why[:3])})"
        report, placement = partition_report(edge, records.messages, native, decomposed, xnn_why.messages)
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
    handle = interposer_handle()
    if handle is not None:
        handle.s2dit_qnn_compat_repacked.restype = ctypes.c_ulong
        report["htp_configs_repacked"] = int(handle.s2dit_qnn_compat_repacked())
    for fb in report["fallbacks"]:
        log.warning("QNN fallback to %s: %s x%d: %s", fb["placed"], fb["op"], fb["count"], fb["reason"])
    return Lowered(bytes(program.buffer), report, quant, rewrites, host, placement)
