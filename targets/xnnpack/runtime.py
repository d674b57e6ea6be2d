"""Host runtime for XNNPACK ``.pte`` files: ``executorch.runtime`` behind the ``Runner`` interface.

``XnnpackRunner.run`` takes named numpy (or torch) inputs, orders them by the artifact's contract,
casts each to the contract dtype, executes ``forward`` and names the outputs. A program compiled with
external weights loads with its ``.ptd`` as ``data_path`` (the runtime takes one data file). ``profile`` runs with
ETDump timing events only and returns per-operator timings through ``executorch.devtools.Inspector``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2dit_deploy.errors import InputError
from s2dit_deploy.targets.base import Runner

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32,
                 "int64": torch.int64, "bool": torch.bool}


class RunnerInputError(InputError):
    """Inputs do not match the artifact's I/O contract."""


class MissingProgramFile(InputError):
    """A ``.pte`` or its ``.ptd`` (external weights) named by the artifact is not on disk."""


def _as_tensor(value: Any, spec: dict[str, Any]) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise RunnerInputError(f"input {spec['name']}: unsupported contract dtype {spec['dtype']}")
    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    if tuple(t.shape) != tuple(spec["shape"]):
        raise RunnerInputError(f"input {spec['name']}: shape {tuple(t.shape)}, the artifact expects "
                               f"{tuple(spec['shape'])} (static shapes)")
    return t.to(dtype).contiguous()


class XnnpackRunner(Runner):
    """One loaded ``.pte`` method with the artifact's named I/O."""

    capabilities = frozenset({"profile", "timed_execute"})
    label = "host CPU time (ExecuTorch XNNPACK runtime)"

    def __init__(self, pte: Path, contract: dict[str, Any], data: Path | None = None):
        from executorch.runtime import Runtime

        # quantize/dequantize nodes left outside the XNNPACK delegate (static int8 graphs) run on
        # the quantized kernel library; without it loading fails with OperatorMissing (0x14)
        import executorch.kernels.quantized  # noqa: F401

        self.pte = Path(pte)
        self.data = Path(data) if data is not None else None
        for f in (self.pte, self.data):
            if f is not None and not f.is_file():
                raise MissingProgramFile(f"{f} is missing: the artifact lists it"
                                         + (" as the .pte's external weights" if f == self.data else "")
                                         + "; copy the whole bundle folder or recompile it")
        self.contract = contract
        self.inputs = list(contract["inputs"])
        self.output_names = [s["name"] for s in contract["outputs"]]
        self._runtime = Runtime.get()
        self._method = self._load()[1]

    def _load(self, **kwargs: Any):
        """(program, forward method), with the ``.ptd`` as the data map when the weights live outside."""
        try:
            program = self._runtime.load_program(self.pte, data_path=self.data, **kwargs)
            return program, program.load_method("forward")
        except RuntimeError as exc:
            where = f" with external weights {self.data.name}" if self.data else " (weights embedded)"
            raise RuntimeError(f"ExecuTorch could not load {self.pte.name}{where}: {exc}") from exc

    def ordered(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        missing = [s["name"] for s in self.inputs if s["name"] not in inputs]
        if missing:
            raise RunnerInputError(f"missing inputs {missing}; the contract needs {[s['name'] for s in self.inputs]}")
        return [_as_tensor(inputs[s["name"]], s) for s in self.inputs]

    def execute(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Positional torch in/out (what the benchmark harness times)."""
        return self._method.execute(tensors)

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        outs = self.execute(self.ordered(inputs))
        if len(outs) != len(self.output_names):
            raise RuntimeError(f"{self.pte.name} returned {len(outs)} outputs, the contract names "
                               f"{len(self.output_names)}")
        return {n: o.detach().numpy() for n, o in zip(self.output_names, outs)}

    def profile(self, inputs: dict[str, Any], runs: int = 3, etrecord: Path | None = None,
                keep_dir: Path | None = None) -> dict[str, Any]:
        """Per-operator timings from ETDump + Inspector over ``runs`` executions (ms, host CPU).

        Only timing events are traced (``debug_buffer_size=0``: no intermediate outputs). A fixed
        debug buffer overflowed on real graphs and the runtime aborts the whole process (SIGABRT,
        "Ran out of space to store intermediate outputs"); operator timings never need it.
        """
        from executorch.devtools import Inspector

        tensors = self.ordered(inputs)
        program, method = self._load(enable_etdump=True, debug_buffer_size=0)
        for _ in range(runs):
            method.execute(tensors)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(keep_dir) if keep_dir else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            etdump = folder / f"{self.pte.stem}.etdp"
            program.write_etdump_result_to_file(str(etdump), str(folder / f"{self.pte.stem}.debug.bin"))
            kwargs: dict[str, Any] = {"etdump_path": str(etdump)}
            if etrecord is not None and Path(etrecord).exists():
                kwargs["etrecord"] = str(etrecord)
            try:
                inspector = Inspector(**kwargs)
            except Exception as exc:  # noqa: BLE001 - an ETRecord mismatch should not lose the timings
                if "etrecord" not in kwargs:
                    raise
                log.warning("Inspector with ETRecord failed (%s); profiling without it", exc)
                kwargs.pop("etrecord")
                inspector = Inspector(**kwargs)
            return summarize_inspector(inspector, runs)


def summarize_inspector(inspector, runs: int) -> dict[str, Any]:
    """Aggregate Inspector events by name: median ms per run, calls, and whether it is a delegate."""
    rows: dict[str, dict[str, Any]] = {}
    method_ms: list[float] = []
    for block in inspector.event_blocks:
        for ev in block.events:
            if ev.perf_data is None:
                continue
            name = ev.name or "?"
            if name == "Method::execute":
                method_ms.extend(ev.perf_data.raw)
                continue
            if name in ("Program::load_method", "Method::init") or name.startswith("Program::"):
                continue
            row = rows.setdefault(name, {"op": name, "samples_ms": [], "delegate": bool(ev.is_delegated_op),
                                         "backend": ev.delegate_backend_name or ""})
            row["samples_ms"].extend(ev.perf_data.raw)
    ops = []
    for row in rows.values():
        samples = row.pop("samples_ms")
        row["calls_per_run"] = round(len(samples) / max(runs, 1), 2)
        row["ms_per_run"] = round(float(np.sum(samples)) / max(runs, 1), 4)
        ops.append(row)
    ops.sort(key=lambda r: -r["ms_per_run"])
    return {"runs": runs, "method_ms_median": round(float(np.median(method_ms)), 4) if method_ms else None,
            "ops": ops, "unit": "ms (host CPU, ETDump)"}
