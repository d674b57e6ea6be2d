"""The ``coreai`` target: each stage as a Core AI ``.aimodel`` (iOS 27 / macOS 27), run on Linux by
Apple's own runtime (coreai-core).

``compile`` rewrites the stage for the Neural Engine (unless ``rewrite=false``), splits a large
``dit_step`` into chained programs as Core ML does, casts each program to its compute precision
(``precision=fp16`` by default: what the Neural Engine computes), compresses it with coreai-opt when
a QuantPlan is given (``compress.py``), converts it with coreai-torch and saves it inside the
bundle. The host <-> device tensor maps travel in the artifact metadata and the asset's custom
metadata. ``load`` runs the program with the Core AI runtime behind those maps, so callers feed and
read the float contract's tensors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import coreai.runtime  # noqa: F401 - the runtime (coreai-core, Python >= 3.11): get_target -> TargetUnavailable

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.rewrites.device_io import maps_from_json, maps_to_json
from s2dit_deploy.stages import Stage
from s2dit_deploy.targets.base import BaseTarget, TargetUnavailable
from s2dit_deploy.targets.coreml.chunks import device_parts, load_chained, uses_splitter
from s2dit_deploy.targets.mapped_runner import DeviceIORunner

from .convert import asset_metadata, convert, device_stage, folder_bytes, save
from .options import CoreAIOptions
from .runtime import LABEL, load_program

log = logging.getLogger(__name__)


class CoreAIRunner(DeviceIORunner):
    label = LABEL


class CoreAITarget(BaseTarget):
    name = "coreai"
    options_cls = CoreAIOptions
    capabilities = frozenset()
    # measured: the Linux runtime's fp16 matmul accumulates in fp16 (a K=8192 dot product equals
    # sequential fp16 summation exactly); the Core ML reference executor rounds once per op instead
    NUMERICS = {"fp16": "Core AI runtime on the Linux CPU, fp16 program: fp16 ops with fp16 accumulation, "
                        "norms widened to fp32",
                "fp32": "Core AI runtime on the Linux CPU, fp32 program: host-exact, not device numerics"}

    def float_stage(self, stage: Stage) -> Stage:
        """As is: ``device_parts`` promotes one chunk at a time (as for Core ML)."""
        return stage

    def prepare(self, pipe: Any, plan: Any, stages: dict[str, Stage], options: dict[str, Any]) -> dict[str, Any]:
        self.parse_options(options)
        if plan is not None and hasattr(plan, "stages"):
            from .compress import check_plan_expressible

            plan.check_target(self.name)
            check_plan_expressible(plan, tuple(stages))  # before any work: coreai-opt must express it
        return dict(options)

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any] | None = None) -> Artifact:
        opts = self.parse_options(options)
        _require("coreai_torch", "coreai-torch (the converter)")
        if plan is not None:
            _require("coreai_opt", "coreai-opt (compression)")
        t0 = time.time()
        dstage = device_stage(stage, opts)
        if plan is not None and uses_splitter(stage, dstage, opts):
            from .compress import PlanNotExpressible

            # coreai-opt quantizes nn.Linear / nn.Conv modules; the splitter's pieces are GraphModules
            # whose weights are plain attributes, so nothing would be compressed
            raise PlanNotExpressible(
                f"stage {stage.name}: a QuantPlan on coreai needs the DiT as one program from fp32 weights; "
                "this one is split into chained pieces (chunks > 1, or fp16/bf16 checkpoint weights), which "
                "coreai-opt cannot quantize: compile with --option chunks=1 from an fp32 checkpoint")
        files, summaries, pieces, sizes = [], [], [], {}
        for part, chunk in device_parts(stage, dstage, opts):
            extra = {"s2dit.quant": None if plan is None else getattr(plan, "name", "plan"),
                     **({"s2dit.chunk": chunk} if chunk else {})}
            prog, summary = convert(part, opts, stage.name, plan)
            k = len(files)
            fname = f"{stage.name}.{k}.aimodel" if chunk else f"{stage.name}.aimodel"
            save(prog, Path(out_dir) / fname, asset_metadata(stage, dstage, opts, extra))
            sizes[fname] = folder_bytes(Path(out_dir) / fname)
            files.append(fname)
            summaries.append(summary)
            if chunk:
                pieces.append(chunk)
            del prog, part  # one program's converter copies at a time
        seconds = time.time() - t0
        log.info("coreai: %s compiled in %.1f s as %d program(s)", stage.name, seconds, len(files))
        options_json = json.loads(json.dumps({f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}))
        meta = {
            "layout": dstage.layout,
            "device_io": {"inputs": maps_to_json(dstage.inputs), "outputs": maps_to_json(dstage.outputs)},
            # the host-loop spec and the runner read the device I/O dtype from options.io_dtype
            "options": {**options_json, "io_dtype": opts.precision},
            "compute_precision": opts.precision,
            "minimum_os": f"iOS {opts.minimum_os} / macOS {opts.minimum_os}",
            "caches": "explicit inputs/outputs (see targets/coreai/convert.py)",
            "runtime": "coreai-core runtime (Linux CPU, program dtype)",
            "asset_bytes": sizes,
            "convert_seconds": round(seconds, 2),
        }
        if pieces:
            meta["chunks"] = pieces
        if plan is None:
            quant: dict[str, Any] = {"precision": opts.precision}
        else:
            quant = summaries[0]  # a plan always compiles the stage as one program (see above)
        return Artifact(stage.name, self.name, files, stage.contract(), quant, meta)

    def check_plan(self, artifact: Artifact, bundle_dir: Path, plan: Any) -> list[str]:
        """Plan vs artifact per layer, except the layers the artifact records as kept fp16 with a
        reason (``quant["kept_float"]``, see compress.py): those are a stated, not a silent, difference."""
        from s2dit_deploy.targets.floors import unmatched_plan_layers

        kept = set((artifact.quant or {}).get("kept_float") or {})
        return [m for m in unmatched_plan_layers(artifact, plan) if m.split(":")[1] not in kept]

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool = False) -> CoreAIRunner:
        io = artifact.metadata["device_io"]
        if artifact.metadata.get("chunks"):
            program = load_chained(Path(bundle_dir), list(artifact.files), artifact.metadata["chunks"],
                                   [m["device_name"] for m in io["outputs"]], load=load_program)
        else:
            program = load_program(Path(bundle_dir) / artifact.files[0])
        return CoreAIRunner(program, maps_from_json(io["inputs"]), maps_from_json(io["outputs"]),
                            artifact.metadata.get("compute_precision", "fp16"))


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise TargetUnavailable(f"target 'coreai' needs {what}: pip install 's2dit-deploy[coreai]' (Python >= 3.11)")


TARGET = CoreAITarget()
