"""Helpers of the Core ML reference-executor tests: tiny MIL programs through a real .mlpackage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

ct = __import__("pytest").importorskip("coremltools")
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from s2dit_deploy.targets.coreml.executor import load_program

IOS18 = ct.target.iOS18


def _builtin(a: np.ndarray) -> Any:
    if a.dtype.kind == "f":
        return types.fp32
    if a.dtype == np.bool_:
        return types.bool
    return types.int32


FP16_PASSES = ["common::add_fp16_cast", "common::const_elimination", "common::cast_optimization",
               "common::dead_code_elimination"]


def fast_convert():
    """ct.convert ends with a full gc.collect (1+ s with torch loaded); skip it in tests."""
    import gc
    from unittest import mock

    return mock.patch.object(gc, "collect", lambda *a, **k: 0)


def build_program(build: Callable[..., Any], inputs: dict[str, np.ndarray], opset: Any = IOS18) -> Program:
    """A pymil program whose inputs are placeholders named as ``inputs``."""
    prog = Program()
    holders = {k: mb.placeholder(shape=v.shape, dtype=_builtin(v), name=k) for k, v in inputs.items()}
    with Function(holders, opset_version=opset) as func:
        out = build(**func.inputs)
        func.set_outputs(list(out) if isinstance(out, (tuple, list)) else [out])
        prog.add_function("main", func)
    return prog


def save_and_load(prog: Program, path: Any, states: list[Any] | None = None, fp16: bool = False):
    """Serialise a pymil program to an .mlpackage and load it with the executor.

    No optimisation passes run (the op under test stays as built); ``fp16`` applies only
    coremltools' fp16 compute-precision pass, as ``ct.convert(compute_precision=FLOAT16)`` does.
    """
    kwargs = {"states": states} if states else {}
    pipeline = ct.PassPipeline(pass_names=FP16_PASSES) if fp16 else ct.PassPipeline.EMPTY
    with fast_convert():
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                           compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                           pass_pipeline=pipeline, skip_model_load=True, **kwargs)
    model.save(str(path))
    return load_program(path)


def run_mil(build: Callable[..., Any], inputs: dict[str, np.ndarray], path: Any, fp16: bool = False
            ) -> list[np.ndarray]:
    program = save_and_load(build_program(build, inputs), path, fp16=fp16)
    out = program.run(inputs)
    return [out[n] for n in program.output_names]


def value_inference_oracle(build: Callable[..., Any], inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """coremltools' own value_inference: the same ops built on const inputs fold to values."""
    with Function({}, opset_version=IOS18):
        # copies: some value_inference implementations write into their input (thresholded_relu)
        out = build(**{k: mb.const(val=v.copy()) for k, v in inputs.items()})
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    vals = [o.val for o in outs]
    assert all(v is not None for v in vals), "op has no value_inference"
    return [np.asarray(v) for v in vals]


def psnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    rmse = float(np.sqrt(np.mean((ref - out) ** 2)))
    peak = float(np.abs(ref).max())
    return float("inf") if rmse == 0 else 20 * np.log10(peak / rmse)


def assert_close_fp16(out: np.ndarray, ref: np.ndarray, rel: float = 4e-3) -> None:
    """fp16 tolerance: a few fp16 ulps relative to the output scale."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(float(np.abs(ref).max()), 1e-3)
    err = float(np.abs(out - ref).max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x scale {scale:.3g}"
