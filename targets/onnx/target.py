"""``onnx`` target: each stage as a float ONNX model (opset 20, static shapes), run on ONNX Runtime CPU.

Options: ``onnx_exporter`` = ``torchscript`` (default: the TorchScript exporter gives the cleanest
static graphs for these stages) or ``dynamo``. With a QuantPlan the stage becomes a static QDQ
model (``s2dit_deploy.quant.onnx``), calibrated on recorded stage inputs (``pipeline`` /
``calibration`` options as for the QNN targets) and run by the same CPU EP.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.stages import Stage

from .export import OrtRunner, export_stage
from .qdq import quantize_qdq

log = logging.getLogger(__name__)


class OnnxTarget:
    name = "onnx"

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        rel = f"{stage.name}.onnx"
        t0 = time.perf_counter()
        exporter = options.get("onnx_exporter", "torchscript")
        if plan is None:
            info = export_stage(stage, Path(out_dir) / rel, exporter)
            quant: dict[str, Any] = {"precision": "fp32"}
        else:
            from s2dit_deploy.targets.qnn.calibration import calibration_args

            plan.check_target(self.name)
            with tempfile.TemporaryDirectory(prefix="s2dit-onnx-") as tmp:
                info = export_stage(stage, Path(tmp) / "float.onnx", exporter)
                names = set(info["inputs"])
                samples = [{n: a.numpy() for n, a in zip(stage.input_names, t) if n in names}
                           for t in calibration_args(stage, options)]
                quant = quantize_qdq(Path(tmp) / "float.onnx", Path(out_dir) / rel, samples, "plan", plan, stage)
        seconds = round(time.perf_counter() - t0, 2)
        log.info("%s: exported %d ONNX nodes in %.1fs (%s)", stage.name, info["nodes"], seconds, quant["precision"])
        return Artifact(stage=stage.name, target=self.name, files=[rel], contract=stage.contract(),
                        quant=quant,
                        metadata={"graph": info, "export_seconds": seconds,
                                  "partition": {"delegated_ops": info["nodes"], "total_ops": info["nodes"],
                                                "delegated_fraction": 1.0, "fallbacks": []},
                                  "runtime": "onnxruntime CPUExecutionProvider"})

    def load(self, artifact: Artifact, bundle_dir: Path) -> OrtRunner:
        return OrtRunner(Path(bundle_dir) / artifact.files[0], artifact.contract)


TARGET = OnnxTarget()
