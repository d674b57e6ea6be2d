"""Reference executor of Core ML ML programs on Linux (coremltools converts here but cannot predict).

``load_program(path)`` reads a saved ``.mlpackage`` (model spec + weight blob) back into a pymil
program with coremltools' own MIL-proto loader (``milproto.load``, which reads
``Data/com.apple.CoreML/weights/weight.bin`` through ``libmilstoragepython``'s blob reader), then
plans a straight-line schedule of its ops. ``Program.run`` executes it in numpy with Core ML's
precision semantics: each op computes in float32 on widened inputs and its result is cast to the
op's declared output dtype, so an fp16 program rounds to fp16 after every op while fp32 ops stay
fp32. Const and ``constexpr_*`` (weight decompression) ops, and any op whose inputs are all
constant, are evaluated once at load time. Stateful programs (``ct.StateType``) read and write a
``ProgramState`` made by ``Program.new_state()``, as Core ML's ``MLState``.

Op implementations live in ``mil_ops`` (registry: op type -> numpy function). An op type, or an
attribute value, the executor does not implement raises ``UnsupportedOpError`` at load time
rather than computing something else. Flexible-shape programs (``ct.RangeDim`` /
``ct.EnumeratedShapes`` inputs) run for the concrete shapes fed, checked against the model's ranges.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

try:
    from s2dit_deploy.errors import InputError
except ImportError:  # loaded as a plain module by a bundle's standalone host/reference_host.py
    class InputError(ValueError):  # type: ignore[no-redef]
        """Bad input to a program (s2dit_deploy.errors.InputError when the package is installed)."""

from .mil_ops import ISSUE_HINT, OPS, StateSlot, UnsupportedOpError, supported_ops  # noqa: F401 (re-exported)
from .mil_ops_checked import check_attributes

log = logging.getLogger(__name__)

# BLAS threads while a program runs: OpenBLAS' spinning worker threads make small matmuls 10-100x
# slower on a shared 2-core machine, so the reference executor defaults to one (env override).
BLAS_THREADS = int(os.environ.get("S2DIT_COREML_EXECUTOR_THREADS", "1"))

class OpExecutionError(RuntimeError):
    """An op failed while running (names the op and its type)."""


def mil_name(name: str) -> str:
    """The name coremltools gives a tensor in the program (``cache.0.k`` -> ``cache_0_k``)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if out and not out[0].isdigit() else "_" + out


def _np_dtype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def _static_shape(var: Any) -> tuple[int, ...] | None:
    shape = tuple(var.shape)
    return shape if all(isinstance(d, (int, np.integer)) for d in shape) else None


def _widen(value: Any) -> Any:
    """fp16 -> fp32 before an op computes (results are cast back to the declared dtype)."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype == np.float16 else value
    if isinstance(value, np.float16):
        return np.float32(value)
    if isinstance(value, np.bool_):
        return bool(value)  # numpy 2 rejects np.bool_ for keepdims and the like
    if isinstance(value, tuple):
        return tuple(_widen(v) for v in value)
    return value


def _flexible_shapes(spec: Any) -> dict[str, tuple[str, list[Any]]]:
    """Input name -> ("enumerated", [shape, ...]) or ("range", [(low, high|None) per dim]) of a
    flexible-shape model (``ct.EnumeratedShapes`` / ``ct.RangeDim`` inputs)."""
    out: dict[str, tuple[str, list[Any]]] = {}
    for feat in spec.description.input:
        if feat.type.WhichOneof("Type") != "multiArrayType":
            continue
        arr = feat.type.multiArrayType
        kind = arr.WhichOneof("ShapeFlexibility")
        if kind == "enumeratedShapes":
            out[feat.name] = ("enumerated", [tuple(int(d) for d in e.shape) for e in arr.enumeratedShapes.shapes])
        elif kind == "shapeRange":
            out[feat.name] = ("range", [(int(r.lowerBound), None if r.upperBound < 0 else int(r.upperBound))
                                        for r in arr.shapeRange.sizeRanges])
    return out


def _check_flexible(name: str, shape: tuple[int, ...], rule: tuple[str, list[Any]] | None) -> None:
    if rule is None:
        return
    kind, allowed = rule
    if kind == "enumerated":
        ok = shape in allowed
    else:
        ok = len(shape) == len(allowed) and all(lo <= d and (hi is None or d <= hi)
                                               for d, (lo, hi) in zip(shape, allowed))
    if not ok:
        raise InputError(f"input {name!r} has shape {shape}; the program accepts {kind} shapes {allowed}: "
                         f"feed one of those")


def _blas_threads(n: int) -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl ships with scikit-learn; without it BLAS keeps its default
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas") if n > 0 else contextlib.nullcontext()


class ProgramState:
    """The state buffers of a stateful program (Core ML's ``MLState``): name -> array."""

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], Any]]):
        self._values = {n: np.zeros(shape, dtype) for n, (shape, dtype) in specs.items()}

    @property
    def names(self) -> list[str]:
        return list(self._values)

    def read_state(self, name: str) -> np.ndarray:
        return self._values[name].copy()

    def write_state(self, name: str, value: np.ndarray) -> None:
        cur = self._values[name]
        value = np.asarray(value)
        if value.shape != cur.shape:
            raise ValueError(f"state {name!r} has shape {cur.shape}, got {value.shape}")
        self._values[name] = value.astype(cur.dtype)


class _Step:
    __slots__ = ("args", "fn", "free", "op", "outs")

    def __init__(self, op: Any, fn: Any, args: dict[str, Any], outs: list[Any]):
        self.op, self.fn, self.args, self.outs = op, fn, args, outs
        self.free: list[str] = []


class Program:
    """An executable ML program: ``run(inputs, state=None) -> outputs`` (numpy in, numpy out)."""

    def __init__(self, spec: Any, mil_program: Any, function_name: str = "main", path: str | None = None):
        from coremltools.converters.mil.mil import types

        self.spec = spec
        self.mil_program = mil_program
        self.path = path
        self.function_name = function_name
        func = mil_program.functions[function_name]
        self.function = func
        self.input_specs: dict[str, tuple[tuple[int, ...] | None, Any]] = {}
        self.state_specs: dict[str, tuple[tuple[int, ...], Any]] = {}
        for name, var in func.inputs.items():
            if types.is_state(var.sym_type):
                self.state_specs[name] = (_static_shape(var), _np_dtype(var))
            else:
                self.input_specs[name] = (_static_shape(var), _np_dtype(var))
        self.output_names = [v.name for v in func.outputs]
        self._output_dtypes = {v.name: _np_dtype(v) for v in func.outputs}
        self.input_names = list(self.input_specs)
        self._flexible = _flexible_shapes(spec) if spec is not None else {}
        self.state_names = list(self.state_specs)
        self.op_types = Counter(op.op_type for op in func.operations)
        self.last_profile: dict[str, float] = {}
        self._plan(func)

    # ---- planning ------------------------------------------------------------------------------
    def _plan(self, func: Any) -> None:
        unknown = [op for op in func.operations if op.op_type != "const" and op.op_type not in OPS]
        for op in func.operations:
            if op.blocks:
                unknown.insert(0, op)
        if unknown:
            others = sorted({o.op_type for o in unknown[1:]} - {unknown[0].op_type})
            raise UnsupportedOpError(unknown[0].op_type, unknown[0].name, others)
        for op in func.operations:
            check_attributes(op)
        self._consts: dict[str, Any] = {}
        self._steps: list[_Step] = []
        t0 = time.perf_counter()
        for op in func.operations:
            if op.op_type == "const":
                val = op.outputs[0].val
                if isinstance(val, np.ndarray):
                    val = val.view()
                    val.flags.writeable = False
                self._consts[op.outputs[0].name] = val
                continue
            args = {k: (tuple(x.name for x in v) if isinstance(v, (tuple, list)) else v.name)
                    for k, v in op.inputs.items()}
            step = _Step(op, OPS[op.op_type], args, list(op.outputs))
            names = [n for v in args.values() for n in (v if isinstance(v, tuple) else (v,))]
            if all(n in self._consts for n in names):
                self._execute(step, self._consts)  # load-time folding (constexpr_* included)
            else:
                self._steps.append(step)
        for n, val in self._consts.items():  # widen fp16 weights once, not on every run
            if isinstance(val, np.ndarray) and val.dtype == np.float16:
                val = val.astype(np.float32)
                val.flags.writeable = False
                self._consts[n] = val
        log.debug("planned %d runtime ops, folded %d values in %.2fs",
                  len(self._steps), len(self._consts), time.perf_counter() - t0)
        last_use: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for v in step.args.values():
                for n in v if isinstance(v, tuple) else (v,):
                    if n not in self._consts:
                        last_use[n] = i
        keep = set(self.output_names) | set(self.state_names)
        for n, i in last_use.items():
            if n not in keep:
                self._steps[i].free.append(n)

    # ---- execution -----------------------------------------------------------------------------
    @staticmethod
    def _execute(step: _Step, env: dict[str, Any], profile: dict[str, float] | None = None) -> None:
        args = {k: _widen(tuple(env[n] for n in v) if isinstance(v, tuple) else env[v])
                for k, v in step.args.items()}
        op = step.op
        t0 = time.perf_counter() if profile is not None else 0.0
        try:
            result = step.fn(op, args)
        except Exception as exc:
            raise OpExecutionError(f"MIL op {op.op_type!r} (op {op.name!r}) failed: {exc}") from exc
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(step.outs):
            raise OpExecutionError(
                f"MIL op {op.op_type!r} (op {op.name!r}) gave {len(results)} outputs, expected {len(step.outs)}")
        for var, value in zip(step.outs, results):
            value = np.asarray(value)
            if value.dtype.kind != "U":
                value = value.astype(_np_dtype(var), copy=False)
            shape = _static_shape(var)
            if shape is not None and value.shape != shape:
                if value.size == int(np.prod(shape)) and (value.ndim == 0 or len(shape) == 0):
                    value = value.reshape(shape)
                else:
                    raise OpExecutionError(
                        f"MIL op {op.op_type!r} (op {op.name!r}): output {var.name!r} has shape "
                        f"{value.shape}, the program declares {shape}")
            if value.ndim == 0:
                env[var.name] = value[()]
            else:
                value.flags.writeable = False  # no op may write into another op's result
                env[var.name] = value
        if profile is not None:
            profile[op.op_type] = profile.get(op.op_type, 0.0) + time.perf_counter() - t0

    def new_state(self) -> ProgramState:
        """Fresh state buffers (zeros) for a stateful program, as ``MLModel.make_state()``."""
        return ProgramState(self.state_specs)

    def run(self, inputs: Mapping[str, Any], state: ProgramState | None = None,
            profile: bool = False) -> dict[str, np.ndarray]:
        """Execute the program on named numpy inputs; returns the named outputs.

        Input names may be given as in the torch stage (``cache.0.k``) or as the program names them
        (``cache_0_k``, see ``mil_name``); outputs carry the program's names.
        Inputs are cast to the program's declared input dtypes (e.g. fp16). A stateful program
        needs ``state`` (from ``new_state()``), which it reads and updates in place.
        """
        inputs = {(k if k in self.input_specs else mil_name(k)): v for k, v in inputs.items()}
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_specs]
        if missing or extra:
            raise KeyError(f"inputs: missing {missing}, unexpected {extra}; the program takes {self.input_names}")
        env: dict[str, Any] = dict(self._consts)
        for name, (shape, dtype) in self.input_specs.items():
            value = np.asarray(inputs[name])
            if shape is not None and value.shape != shape:
                raise InputError(f"input {name!r} has shape {value.shape}, the program expects {shape}")
            if shape is None:
                _check_flexible(name, tuple(value.shape), self._flexible.get(name))
            env[name] = value.astype(dtype)
        slots: dict[str, StateSlot] = {}
        if self.state_names:
            if state is None:
                raise ValueError(f"this program is stateful ({self.state_names}); pass state=program.new_state()")
            for name in self.state_names:
                slots[name] = env[name] = StateSlot(name, state._values[name])
        prof: dict[str, float] | None = {} if profile else None
        with _blas_threads(BLAS_THREADS):
            for step in self._steps:
                self._execute(step, env, prof)
                for n in step.free:
                    env.pop(n, None)
        for name, slot in slots.items():
            state._values[name] = slot.value  # type: ignore[union-attr]
        if prof is not None:
            self.last_profile = prof
        # writeable copies in the declared dtypes
        return {n: np.array(env[n], dtype=self._output_dtypes[n]) for n in self.output_names}

    def __repr__(self) -> str:
        return (f"Program({self.path or '<in-memory>'}, inputs={self.input_names}, "
                f"outputs={self.output_names}, states={self.state_names}, ops={sum(self.op_types.values())})")


def program_from_model(model: Any, function_name: str | None = None) -> Program:
    """A ``Program`` from an ``MLModel`` (e.g. the result of ``ct.convert``), through its spec."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    spec = model.get_spec()
    fname = function_name or spec.description.defaultFunctionName or "main"
    prog = load_milproto(spec, spec.specificationVersion, model.weights_dir)
    return Program(spec, prog, fname, getattr(model, "package_path", None))


def load_program(path: str | Path, function_name: str | None = None) -> Program:
    """Load a saved ``.mlpackage`` (ML program) for execution with the reference executor."""
    import coremltools as ct

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Core ML package at {path}")
    t0 = time.perf_counter()
    model = ct.models.MLModel(str(path), skip_model_load=True)
    if model.get_spec().WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{path} is not an ML program (neural networks are not supported)")
    program = program_from_model(model, function_name)
    program.path = str(path)
    log.info("loaded %s: %d ops (%d at run time) in %.2fs", path.name, sum(program.op_types.values()),
             len(program._steps), time.perf_counter() - t0)
    return program
