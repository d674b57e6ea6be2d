"""Export a stage to ONNX (opset 20, static shapes) and run ONNX models with ONNX Runtime.

The graph keeps the stage's contract names for its inputs and outputs. Opset 20 matters: from
opset 20 GELU is one ``Gelu`` node (opset 17 spells it with ``Erf``, which the QNN EP cannot
quantize). Shapes are all static (no dynamic axes), so every Reshape has a constant shape.
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
from s2dit_deploy.targets.base import Runner

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


def export_stage(stage: Stage, path: Path, exporter: str = "torchscript", opset: int = OPSET) -> dict[str, Any]:
    """Write ``stage`` as ``path`` (.onnx); returns graph facts (op histogram, opset, exporter)."""
    import onnx

    path = Path(path)
    kwargs = {"input_names": stage.input_names, "output_names": stage.output_names, "opset_version": opset,
              "do_constant_folding": True}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(stage.module, stage.example_inputs, str(path), dynamo=False, **kwargs)
        elif exporter == "dynamo":
            prog = torch.onnx.export(stage.module, stage.example_inputs, dynamo=True, optimize=True,
                                     input_names=stage.input_names, output_names=stage.output_names,
                                     opset_version=opset)
            prog.save(str(path))
        else:
            raise ValueError(f"unknown ONNX exporter {exporter!r}: torchscript or dynamo")
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"{stage.name}: exported ONNX graph is invalid: {exc}") from exc
    ops = Counter(n.op_type for n in model.graph.node)
    dynamic = [i.name for i in model.graph.input
               if any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
    if dynamic:
        raise OnnxExportError(f"{stage.name}: inputs {dynamic} have dynamic dimensions")
    if "Erf" in ops:
        log.warning("%s: the ONNX graph has Erf nodes (GELU not fused); QNN cannot quantize Erf", stage.name)
    return {"opset": opset, "exporter": exporter, "nodes": sum(ops.values()), "ops": dict(sorted(ops.items())),
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}


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
