"""Export a stage to ONNX (opset 20, static shapes) and run ONNX models with ONNX Runtime.

The graph keeps the stage's contract names for its inputs and outputs. Opset 20 matters: from
opset 20 GELU is one ``Gelu`` node (opset 17 spells it with ``Erf``, which the QNN EP cannot
quantize). Shapes are all static (no dynamic axes), so every Reshape has a constant shape. With external weights
the model's tensors go to ``<model>.onnx.data`` (``external.py``); ORT opens the model by path and
finds the data file beside it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2dit_deploy.stages import Stage
from s2dit_deploy.targets.base import Runner, TargetOptionError

from .external import PROTOBUF_LIMIT, externalize, uses_external_data
from .options import EXTERNAL_WEIGHTS_BOUND

log = logging.getLogger(__name__)

OPSET = 20
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


class OnnxExportError(RuntimeError):
    """A stage could not be exported to a clean static ONNX graph."""


@contextlib.contextmanager
def build_folder(out_dir: Path, stage_name: str) -> Iterator[Path]:
    """A hidden work folder inside the bundle's partial folder (``out_dir``), removed on exit.

    Not the system temp folder: a compile killed by SIGTERM/SIGKILL leaves its intermediate
    models inside its own partial, which the next compile to that path removes."""
    work = Path(out_dir) / f".{stage_name}.onnx-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stage_weight_bytes(stage: Stage) -> int:
    """Bytes of the stage module's parameters and buffers (each storage once)."""
    seen: set[int] = set()
    total = 0
    for t in (*stage.module.parameters(), *stage.module.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def want_external(policy: str, stage: Stage, bound: int = EXTERNAL_WEIGHTS_BOUND) -> bool:
    """``external_weights`` resolved for a stage; ``never`` with weights past 2 GiB is refused here,
    before any export work, since no ONNX protobuf can hold them."""
    nbytes = stage_weight_bytes(stage)
    if policy == "always":
        return True
    if policy == "never":
        if nbytes >= PROTOBUF_LIMIT:
            raise TargetOptionError(
                f"option 'external_weights' is never, but stage {stage.name} has {nbytes / 2**30:.2f} GiB of "
                "weights and an ONNX protobuf stops at 2 GiB; use external_weights=auto or always")
        return False
    if policy != "auto":
        raise TargetOptionError(f"option 'external_weights' must be auto, always or never, got {policy!r}")
    return nbytes > bound


def _export(stage: Stage, path: Path, exporter: str, opset: int, external: bool) -> None:
    kwargs = {"input_names": stage.input_names, "output_names": stage.output_names, "opset_version": opset,
              "do_constant_folding": True}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            # above 2 GiB this exporter writes one file per tensor beside ``path`` itself
            torch.onnx.export(stage.module, stage.example_inputs, str(path), dynamo=False, **kwargs)
        elif exporter == "dynamo":
            prog = torch.onnx.export(stage.module, stage.example_inputs, dynamo=True, optimize=True,
                                     input_names=stage.input_names, output_names=stage.output_names,
                                     opset_version=opset)
            # onnx-ir streams each tensor into <path>.data; no protobuf holds the weights
            prog.save(str(path), external_data=True if external else None)
        else:
            raise ValueError(f"unknown ONNX exporter {exporter!r}: torchscript or dynamo")


def export_stage(stage: Stage, path: Path, exporter: str = "torchscript", opset: int = OPSET,
                 external: bool = False) -> dict[str, Any]:
    """Write ``stage`` as ``path`` (.onnx), with its weights in ``<path>.data`` when ``external``;
    returns graph facts (op histogram, opset, exporter, external data)."""
    import onnx

    path = Path(path)
    ext_info = None
    if external:
        with build_folder(path.parent, f"{path.stem}.export") as work:
            _export(stage, work / path.name, exporter, opset, external=True)
            ext_info = externalize(work / path.name, path)
    else:
        _export(stage, path, exporter, opset, external=False)
        refs = uses_external_data(onnx.load(str(path), load_external_data=False))
        if refs:
            for f in refs:
                (path.parent / f).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise OnnxExportError(f"{stage.name}: the exporter wrote the weights outside the model "
                                  f"({len(refs)} file(s)): they exceed the 2 GiB protobuf limit; compile with "
                                  "external_weights=auto or always")
    try:
        onnx.checker.check_model(str(path))  # by path: external data is checked, never loaded
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"{stage.name}: exported ONNX graph is invalid: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    dynamic = [i.name for i in model.graph.input
               if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
    if dynamic:
        raise OnnxExportError(f"{stage.name}: inputs {dynamic} have dynamic dimensions")
    if "Erf" in ops:
        log.warning("%s: the ONNX graph has Erf nodes (GELU not fused); QNN cannot quantize Erf", stage.name)
    return {"opset": opset, "exporter": exporter, "nodes": sum(ops.values()), "ops": dict(sorted(ops.items())),
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "external_data": ext_info}


def feed(session, contract_inputs: list[dict[str, Any]], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs the session actually has (an exporter may drop unused ones), cast to contract dtypes."""
    specs = {s["name"]: s for s in contract_inputs}
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise KeyError(f"missing inputs {missing}")
    return {n: np.ascontiguousarray(inputs[n], dtype=_NP.get(specs[n]["dtype"], np.float32)).reshape(specs[n]["shape"])
            for n in names}


class OrtRunner(Runner):
    """An ONNX Runtime session with named numpy I/O (CPU by default)."""

    def __init__(self, path: Path, contract: dict[str, Any], session=None):
        import onnxruntime as ort

        self.path = Path(path)
        self.contract = contract
        if session is None:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, feed(self.session, self.contract["inputs"], inputs))
        return dict(zip(self.output_names, outs))
