"""Compile memory budget: estimate a compile's peak RSS per stage and refuse it before any work.

Why: a paper-scale compile that runs out of memory dies after minutes (or takes the machine
down) instead of saying what to change. The estimate is coarse by design, per stage:

    peak = base + resident float weights (all three stages: the pipeline loads them all)
                + target working copies of this stage's weights / pieces

Working copies are ``factor * fp32 bytes of the stage`` (toolchains upcast while converting, so
fp32 is the conservative unit), divided by ``pieces`` when the target compiles the stage piece
by piece (``--option chunks=N`` / ``shards=N``). Each factor says where it comes from; only
Core ML's is measured at paper scale so far: refine the others when measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_BOUND_BYTES = 20 * GIB  # issue 10: peak RSS <= 20 GB on the 24 GB machine
# Python + torch + transformers + a toolchain, before any weights: 0.58 GiB anonymous RSS measured
# after loading s2dit-mobile lazily (torch 2.13, transformers 5.24); rounded up for coremltools /
# executorch / onnxruntime imports.
BASE_BYTES = 1 * GIB
STAGE_WEIGHTS = {"text_encoder": "text_encoder", "dit_step": "dit", "decoder": "decoder"}


@dataclass(frozen=True)
class TargetFactor:
    """Working memory of a target's conversion, in fp32 copies of the stage's weights."""

    working_fp32_copies: float
    split_option: str | None  # the --option that compiles a stage in pieces, if the target has one
    source: str


TARGET_FACTORS: dict[str, TargetFactor] = {
    "coreml": TargetFactor(
        1.0, None,
        "measured (2026-12-02): `compile s2dit-mobile --checkpoint <fp16 init> --target coreml --stages dit_step` "
        "(4 auto chunks) reached 11.5 GiB RSS while converting, with the fp16 pipeline (3.67 GiB, file-mapped) "
        "resident: (11.5 - 1.0 - 3.67) / 6.82 GiB of fp32 DiT weights = 1.0. Chunks (an on-device load limit) "
        "do not lower it: mapped checkpoint pages and converter caches stay resident, so no split option"),
    "executorch-xnnpack": TargetFactor(
        2.0, None,
        "estimate, not measured at paper scale: the XNNPACK delegate packs a copy of the weights and the "
        "serialized program (or its .ptd named data) holds another (1 + 1)"),
    "executorch-qnn": TargetFactor(
        2.5, "shards",
        "estimate, not measured at paper scale: PT2E prepare/convert keeps a quantized copy (1), the QNN "
        "context binary another (1), plus observers and the lowered graph (0.5)"),
    "onnx": TargetFactor(
        3.0, None,
        "estimate, not measured at paper scale: ONNX initializers copied out of torch (1), external-data save "
        "(streamed, ~0) and the ONNX Runtime smoke session with its optimized graph (2)"),
    "onnx-qnn": TargetFactor(
        3.5, None,
        "estimate, not measured at paper scale: the onnx factor (3) plus the QDQ model that "
        "onnxruntime.quantization writes before EPContext generation (0.5)"),
    "coreai": TargetFactor(
        2.0, None,
        "one fp32 chunk copy for torch.export (1), its program copy (0.5) and coreai-torch's constants (0.5); "
        "checked (2026-12-02): `compile s2dit-mobile --checkpoint <fp16 init> --target coreai --stages dit_step "
        "--option precision=fp32` (4 auto chunks) peaked at 17.5 GiB max RSS, in its smoke run, against 18.33 GiB "
        "estimated"),
}

# a target registered later (or a test's) without a measured factor: the most conservative one
UNKNOWN_TARGET = TargetFactor(3.5, None, "no factor for this target: the most conservative known one (onnx-qnn)")


class MemoryBudgetError(InputError):
    """A compile would exceed the memory bound; raised before any work (CLI exit 3)."""

    def __init__(self, message: str, estimate: dict[str, Any]):
        super().__init__(message)
        self.payload = {"memory_estimate": estimate}


def _dtype_of(dtype: Any, weights: str) -> torch.dtype:
    d = dtype.get(weights, torch.float32) if isinstance(dtype, Mapping) else dtype
    if isinstance(d, str):
        d = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(d) or getattr(torch, d)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise InputError(f"dtype {dtype!r}: a floating torch dtype (or fp16 / bf16 / fp32) per stage is needed")
    return d


def _pieces(options: Mapping[str, Any] | None, factor: TargetFactor) -> int:
    if not options or factor.split_option is None or factor.split_option not in options:
        return 1
    value = options[factor.split_option]
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--option {factor.split_option}={value!r} must be a positive integer") from None
    if n < 0:
        raise InputError(f"--option {factor.split_option}={n} must be >= 0 (0 = automatic)")
    n = max(n, 1)  # 0: the target picks the count from its size bound; estimate as one piece
    return n


def estimate_compile_memory(config, target: str, stages, options: Mapping[str, Any] | None = None,
                            dtype: Any = torch.float32, params: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Estimated peak bytes of each stage's compile (see the module docstring for the model).

    ``dtype``: the float weights' dtype as loaded, one torch dtype or {"dit": ..., ...};
    ``params``: parameter counts per weights stage (default: counted on the meta device)."""
    unknown = [s for s in stages if s not in STAGE_WEIGHTS]
    if unknown:
        raise InputError(f"unknown stages {unknown}; stages are {', '.join(STAGE_WEIGHTS)}")
    if params is None:
        from .model_zoo.stats import stage_params

        params = stage_params(config)
    factor = TARGET_FACTORS.get(target, UNKNOWN_TARGET)
    pieces = _pieces(options, factor)
    resident = {w: int(params[w]) * _dtype_of(dtype, w).itemsize for w in STAGE_WEIGHTS.values()}
    per_stage = {}
    for stage in stages:
        w = STAGE_WEIGHTS[stage]
        working = int(factor.working_fp32_copies * params[w] * 4 / pieces)
        per_stage[stage] = {"resident_weights": sum(resident.values()), "working": working,
                            "base": BASE_BYTES, "pieces": pieces,
                            "peak": BASE_BYTES + sum(resident.values()) + working}
    worst = max(per_stage, key=lambda s: per_stage[s]["peak"]) if per_stage else None
    return {"model": config.name, "target": target, "stages": per_stage, "worst_stage": worst,
            "peak": per_stage[worst]["peak"] if worst else BASE_BYTES,
            "dtype": {w: str(_dtype_of(dtype, w)).replace("torch.", "") for w in STAGE_WEIGHTS.values()},
            "factor": {"working_fp32_copies": factor.working_fp32_copies, "split_option": factor.split_option,
                       "source": factor.source}}


def available_bytes() -> int | None:
    """MemAvailable of this machine (Linux), None where /proc/meminfo does not exist."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _advice(config, target, stages, options, dtype, params, bound: int, est: dict[str, Any]) -> list[str]:
    """What would bring the estimate under the bound, each checked with the same estimate."""
    factor, tips = TARGET_FACTORS.get(target, UNKNOWN_TARGET), []
    worst = est["worst_stage"]
    if any(_dtype_of(dtype, w).itemsize > 2 for w in STAGE_WEIGHTS.values()):
        half = estimate_compile_memory(config, target, stages, options, torch.float16, params)
        fits = "fits" if half["peak"] <= bound else "still above"
        tips.append(f"load fp16 weights (an fp16 checkpoint, e.g. `s2dit-deploy init {config.name} -o DIR "
                    f"--dtype fp16`): {_gib(half['peak'])}, {fits} the bound")
    if factor.split_option is not None:
        for n in (2, 4, 8, 16, 32):
            opts = {**(options or {}), factor.split_option: n}
            if n > est["stages"][worst]["pieces"] and \
                    estimate_compile_memory(config, target, stages, opts, dtype, params)["peak"] <= bound:
                tips.append(f"compile {worst} in pieces: --option {factor.split_option}={n}")
                break
    if len(stages) > 1:
        tips.append(f"compile fewer stages per run (--stages {worst} alone, then the others)")
    tips.append("free memory on this machine or raise the bound if it has more")
    return tips


def check_memory_budget(config, target: str, stages, options: Mapping[str, Any] | None = None,
                        dtype: Any = torch.float32, bound_bytes: int | None = None,
                        available: int | None = None, params: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The estimate when it fits under the bound, else ``MemoryBudgetError`` (before any work).

    The bound is ``bound_bytes`` (default 20 GiB) or the machine's available memory when lower
    (``available``: default MemAvailable; pass it to make the check independent of the machine)."""
    if params is None:
        from .model_zoo.stats import stage_params

        params = stage_params(config)
    est = estimate_compile_memory(config, target, stages, options, dtype, params)
    limit = DEFAULT_BOUND_BYTES if bound_bytes is None else int(bound_bytes)
    avail = available_bytes() if available is None else int(available)
    bound = min(limit, avail) if avail is not None else limit
    est.update({"bound": bound, "bound_setting": limit, "available": avail})
    if est["peak"] <= bound:
        log.info("%s -> %s: estimated peak %s within %s", config.name, target, _gib(est["peak"]), _gib(bound))
        return est
    worst = est["stages"][est["worst_stage"]]
    why = (f"the machine's available memory, below the {_gib(limit)} bound"
           if avail is not None and avail < limit else "the bound set for this compile")
    tips = _advice(config, target, stages, options, dtype, params, bound, est)
    raise MemoryBudgetError(
        f"compiling {config.name} for {target} needs an estimated {_gib(est['peak'])} at stage "
        f"{est['worst_stage']} (base {_gib(worst['base'])} + float weights {_gib(worst['resident_weights'])} "
        f"({'/'.join(sorted(set(est['dtype'].values())))}) + {target} working copies {_gib(worst['working'])} "
        f"in {worst['pieces']} piece(s)), above the bound of {_gib(bound)} ({why}). To fit: "
        + "; ".join(tips) + ".", est)


def pieces_needed(config, target: str, stage: str, bound_bytes: int, dtype: Any = torch.float32,
                  params: Mapping[str, int] | None = None) -> int | None:
    """Smallest piece count that brings ``stage`` under ``bound_bytes`` (None if none can)."""
    factor = TARGET_FACTORS.get(target, UNKNOWN_TARGET)
    if factor.split_option is None:
        return None
    if params is None:
        from .model_zoo.stats import stage_params

        params = stage_params(config)
    one = estimate_compile_memory(config, target, (stage,), None, dtype, params)["stages"][stage]
    room = bound_bytes - one["base"] - one["resident_weights"]
    if room <= 0:
        return None
    return max(1, math.ceil(one["working"] / room))
