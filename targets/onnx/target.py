"""``onnx`` target: each stage as a float ONNX model (opset 20, static shapes), run on ONNX Runtime CPU.

Options (``targets/onnx/options.py``): ``onnx_exporter`` = ``torchscript`` (default: the TorchScript
exporter gives the cleanest static graphs for these stages) or ``dynamo``; ``precision`` fp32;
``external_weights`` (auto | always | never: the weights in ``<stage>.onnx.data``, see external.py).
With a QuantPlan the stage becomes a static QDQ model (``s2dit_deploy.quant.onnx``), calibrated on
recorded stage inputs (``pipeline`` / ``calibration`` options as for the QNN targets) and run by the
same CPU EP.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.stages import Stage

from s2dit_deploy.targets.base import BaseTarget

from .export import OrtRunner, build_folder, export_stage, stage_weight_bytes, want_external
from .external import PROTOBUF_LIMIT, check_model_files, externalize
from .options import EXTERNAL_WEIGHTS_BOUND, OnnxOptions
from .qdq import quantize_qdq

log = logging.getLogger(__name__)


class OnnxTarget(BaseTarget):
    name = "onnx"
    options_cls = OnnxOptions
    capabilities = frozenset()

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        rel = f"{stage.name}.onnx"
        t0 = time.perf_counter()
        opts = self.parse_options(options)  # unknown keys and bad values fail before any work
        exporter = opts.onnx_exporter
        external = want_external(opts.external_weights, stage)
        if plan is None:
            info = export_stage(stage, Path(out_dir) / rel, exporter, external=external)
            ext = info["external_data"]
            quant: dict[str, Any] = {"precision": opts.precision}
        else:
            from s2dit_deploy.targets.qnn.calibration import calibration_args

            plan.check_target(self.name)
            with build_folder(out_dir, stage.name) as work:  # inside the partial, never the system temp
                # the QDQ tools rewrite the float model in memory: it stays one protobuf below 2 GiB
                info = export_stage(stage, work / "float.onnx", exporter,
                                    external=stage_weight_bytes(stage) >= PROTOBUF_LIMIT)
                names = set(info["inputs"])
                samples = [{n: a.numpy() for n, a in zip(stage.input_names, t) if n in names}
                           for t in calibration_args(stage, options)]
                quant = quantize_qdq(work / "float.onnx", work / rel, samples, "plan", plan, stage,
                                     plan_layers_only=True)
                if external:
                    ext = externalize(work / rel, Path(out_dir) / rel)
                else:
                    ext = None
                    (work / rel).replace(Path(out_dir) / rel)
        files = [rel] + ([ext["data_file"]] if ext else [])
        seconds = round(time.perf_counter() - t0, 2)
        log.info("%s: exported %d ONNX nodes in %.1fs (%s)", stage.name, info["nodes"], seconds, quant["precision"])
        return Artifact(stage=stage.name, target=self.name, files=files, contract=stage.contract(),
                        quant=quant,
                        metadata={"graph": info, "export_seconds": seconds,
                                  "external_weights": {"policy": opts.external_weights, "external": external,
                                                       "weight_bytes": stage_weight_bytes(stage),
                                                       "auto_bound_bytes": EXTERNAL_WEIGHTS_BOUND,
                                                       **(ext or {})},
                                  "partition": {"delegated_ops": info["nodes"], "total_ops": info["nodes"],
                                                "delegated_fraction": 1.0, "fallbacks": []},
                                  "runtime": "onnxruntime CPUExecutionProvider"})

    def check_plan(self, artifact: Artifact, bundle_dir: Path, plan: Any) -> list[str]:
        """Planned vs built per-layer bits, read from the QDQ model itself (``qdq.plan_mismatches``)."""
        from . import qdq

        if plan is None or not hasattr(plan, "stages") or not hasattr(qdq, "plan_mismatches"):
            return []
        return list(qdq.plan_mismatches(Path(bundle_dir) / artifact.files[0], plan, artifact.stage))

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool = False) -> OrtRunner:
        check_model_files(artifact, bundle_dir)
        return OrtRunner(artifact.path(bundle_dir, 0), artifact.contract)


TARGET = OnnxTarget()
