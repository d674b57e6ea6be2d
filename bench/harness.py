"""``sd.bench(bundle)``: time every stage of a bundle on its host runtime, with per-operator profiles.

For each stage the harness loads the artifact through its target's ``load()`` (any target whose
runner has ``run(dict of numpy)``), runs ``warmup`` calls that are not timed, then ``repeats``
timed calls, and reports the median and the spread (p10, p90, IQR) in milliseconds. Runners that
declare ``timed_execute`` (the ExecuTorch XNNPACK runner) are timed on ``execute`` alone, so input
conversion is not counted. Runners that declare ``profile`` add a per-operator table (ExecuTorch:
ETDump + ``executorch.devtools.Inspector``; QNN: HTP emulator events), taken after the timings; a
profiler failure is reported in the stage's ``profile_error`` and never loses them.

Every number is labelled with what it measures: host CPU time for XNNPACK and ONNX Runtime CPU,
"reference executor time, not device time" for Core ML's MIL executor, emulator time for QNN.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# what a runner's time means, per target (a runner's own ``label`` attribute wins)
TIME_LABELS = {
    "executorch-xnnpack": "host CPU time (ExecuTorch XNNPACK runtime)",
    "onnx": "host CPU time (ONNX Runtime CPU EP)",
    "coreml": "reference executor time, not device time (MIL program interpreted on the host)",
    "executorch-qnn": "HTP emulator time on the x86 host, not phone time",
    "onnx-qnn": "HTP emulator time on the x86 host, not phone time",
    "coreai": "Core AI runtime on the Linux CPU, not device time",
}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def synthetic_inputs(contract: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the contract's shapes and dtypes: N(0, 0.5) floats, token ids, a full cache window.

    Timing of these static graphs does not depend on the values; values are kept finite and in
    the ranges the stages see (valid-slot flags of 1, t in (0, 1)).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in contract["inputs"]:
        name, shape = spec["name"], tuple(spec["shape"])
        dtype = _NP_DTYPES.get(spec["dtype"], np.float32)
        if np.issubdtype(dtype, np.integer):
            out[name] = rng.integers(0, 1000, size=shape).astype(dtype)
        elif "valid" in name:
            out[name] = np.ones(shape, dtype)
        elif name == "t":
            out[name] = np.full(shape, 0.5, dtype)
        else:
            out[name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
    return out


def time_stats(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"median_ms": round(float(p50), 4), "p10_ms": round(float(p10), 4), "p90_ms": round(float(p90), 4),
            "iqr_ms": round(float(p75 - p25), 4), "mean_ms": round(float(a.mean()), 4),
            "min_ms": round(float(a.min()), 4), "n": int(a.size)}


def time_callable(fn, repeats: int, warmup: int) -> dict[str, float]:
    """Median and spread of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats} warmup={warmup}")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return time_stats(samples)


def time_interleaved(fns: dict[str, Any], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Time several callables round-robin, so load from other processes hits each alike.

    Side-by-side ratios on a shared machine are only meaningful when the cases are measured
    interleaved rather than one after another.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats} warmup={warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter_ns()
            fn()
            samples[k].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: time_stats(v) for k, v in samples.items()}


def _timed_call(runner, inputs: dict[str, np.ndarray]):
    if "timed_execute" in runner.capabilities:
        tensors = runner.ordered(inputs)
        return lambda: runner.execute(tensors), "runtime execute (inputs pre-converted)"
    return lambda: runner.run(inputs), "runner.run (includes input/output conversion)"


def bench_bundle(bundle, repeats: int = 20, warmup: int = 3, stages: tuple[str, ...] | None = None,
                 profile: bool = True, profile_runs: int = 3, device: str | None = None,
                 out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Time each stage of ``bundle`` (a Bundle or a bundle folder) on this machine."""
    from s2dit_deploy.bundle import Bundle, load_bundle
    from s2dit_deploy.targets.base import get_target

    if device is not None:
        raise ValueError(f"device={device!r}: per-device latency estimates are not implemented; "
                         "sd.bench measures host runtimes only (leave device unset)")
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    target = get_target(bundle.target)
    names = tuple(stages) if stages else tuple(bundle.artifacts)
    unknown = [s for s in names if s not in bundle.artifacts]
    if unknown:
        raise KeyError(f"bundle {bundle.path} has no stage(s) {unknown}; it has {list(bundle.artifacts)}")
    report: dict[str, Any] = {
        "bundle": str(bundle.path), "target": bundle.target, "model": bundle.model.get("name"),
        "quant": {k: a.quant for k, a in bundle.artifacts.items()},
        "host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "python": platform.python_version()},
        "repeats": repeats, "warmup": warmup, "stages": {},
    }
    for name in names:
        art = bundle.artifacts[name]
        runner = target.load(art, bundle.path, profile=profile)
        inputs = synthetic_inputs(art.contract)
        fn, what = _timed_call(runner, inputs)
        entry: dict[str, Any] = {
            "label": getattr(runner, "label", None) or TIME_LABELS.get(bundle.target, "host time"),
            "timed": what, **time_callable(fn, repeats, warmup),
        }
        if "delegation" in art.metadata:
            d = art.metadata["delegation"]
            entry["delegation"] = {k: d[k] for k in ("delegated_nodes", "portable_nodes", "fallback_ops") if k in d}
        report["stages"][name] = entry  # the timings are kept whatever the profiler does next
        if profile and "profile" in runner.capabilities:
            if out_dir:  # on disk before the profiler runs: even a native abort cannot lose them
                write_report(report, out_dir)
            etrecord = target.etrecord(art, bundle.path) if "etrecord" in target.capabilities else None
            keep = Path(out_dir) / "etdump" if out_dir else None
            try:
                entry["profile"] = runner.profile(inputs, runs=profile_runs, etrecord=etrecord, keep_dir=keep)
            except Exception as exc:  # noqa: BLE001 - a profiler failure must not lose the timings
                log.warning("profiling %s failed: %s", name, exc)
                entry["profile_error"] = f"{type(exc).__name__}: {exc}"
        log.info("%s: median %.2f ms (p10 %.2f, p90 %.2f)", name, entry["median_ms"], entry["p10_ms"], entry["p90_ms"])
    if out_dir:
        write_report(report, out_dir)
    return report


def to_markdown(report: dict[str, Any], top_ops: int = 12) -> str:
    lines = [f"# Benchmark: {report['model']} on {report['target']}", "",
             f"bundle `{report['bundle']}`; {report['repeats']} timed runs after {report['warmup']} warm-up runs; "
             f"host {report['host']['processor']} ({report['host']['cpus']} CPUs).", "",
             "| stage | median ms | p10 ms | p90 ms | IQR ms | what the time is |", "|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        lines.append(f"| {name} | {s['median_ms']:.3f} | {s['p10_ms']:.3f} | {s['p90_ms']:.3f} | {s['iqr_ms']:.3f} "
                     f"| {s['label']} |")
    for name, s in report["stages"].items():
        prof = s.get("profile")
        if not prof:
            continue
        per_run = "ms / run" if all("ms_per_run" in op for op in prof["ops"]) else "value / run"
        lines += ["", f"## {name}: per-operator profile ({prof['unit']}, {prof['runs']} runs)", "",
                  f"| op | backend | calls / run | {per_run} |", "|---|---|---|---|"]
        for op in prof["ops"][:top_ops]:
            value = op.get("ms_per_run", op.get("value_per_run"))
            lines.append(f"| {op['op']} | {op['backend'] or 'portable CPU'} | {op['calls_per_run']} | {value:.4f} |")
        if len(prof["ops"]) > top_ops:
            lines.append(f"| ({len(prof['ops']) - top_ops} more in bench.json) | | | |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(to_markdown(report))
    return {"json": str(out / "bench.json"), "markdown": str(out / "bench.md")}
