"""``onnx`` target: each stage as a float ONNX model (opset 20, static shapes), run on ONNX Runtime CPU.

Options: ``onnx_exporter`` = ``torchscript`` (default: the TorchScript exporter gives the cleanest
static graphs for these stages) or ``dynamo``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.stages import Stage

from .export import OrtRunner, export_stage

log = logging.getLogger(__name__)


def plan_unsupported(plan: Any, target: str) -> None:
    """QuantPlans reach ONNX through s2dit_deploy.quant.onnx; say so clearly when it is absent."""
    if plan is None:
        return
    try:
        import s2dit_deploy.quant.onnx  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(
            f"a QuantPlan was given for {target} but s2dit_deploy.quant.onnx (the QuantPlan -> "
            "onnxruntime.quantization translation) is not available in this version; compile "
            "with quant=None (the onnx-qnn target quantizes with precision='8a8w')") from exc


class OnnxTarget:
    name = "onnx"

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        if plan is not None:
            plan_unsupported(plan, self.name)
            raise NotImplementedError("the onnx target runs float models on CPU; use onnx-qnn for QDQ models")
        rel = f"{stage.name}.onnx"
        t0 = time.perf_counter()
        info = export_stage(stage, Path(out_dir) / rel, options.get("onnx_exporter", "torchscript"))
        seconds = round(time.perf_counter() - t0, 2)
        log.info("%s: exported %d ONNX nodes in %.1fs", stage.name, info["nodes"], seconds)
        return Artifact(stage=stage.name, target=self.name, files=[rel], contract=stage.contract(),
                        quant={"precision": "fp32"},
                        metadata={"graph": info, "export_seconds": seconds,
                                  "partition": {"delegated_ops": info["nodes"], "total_ops": info["nodes"],
                                                "delegated_fraction": 1.0, "fallbacks": []},
                                  "runtime": "onnxruntime CPUExecutionProvider"})

    def load(self, artifact: Artifact, bundle_dir: Path) -> OrtRunner:
        return OrtRunner(Path(bundle_dir) / artifact.files[0], artifact.contract)


TARGET = OnnxTarget()
