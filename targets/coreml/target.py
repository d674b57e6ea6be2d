"""The ``coreml`` target: compile a stage to ``<stage>.mlpackage``; run it with the reference executor.

``compile`` rewrites the stage for the Neural Engine (unless ``rewrite=false``), converts it
(iOS18, fp16 compute, compute units ALL), applies a QuantPlan through
``s2dit_deploy.quant.coreml.apply_plan`` when one is given, saves the package and returns an
``Artifact`` whose contract is the stage's host contract; the host <-> device tensor maps (layout,
fp16-safe cache scales, one-hot step selector) travel in the artifact metadata and the model's
``user_defined_metadata``. ``load`` gives a Runner that applies those maps around the Linux
reference executor, so callers feed and read the float contract's tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any


from s2dit_deploy.bundle import Artifact
from s2dit_deploy.rewrites.device_io import maps_from_json, maps_to_json
from s2dit_deploy.stages import Stage
from s2dit_deploy.targets.base import BaseTarget, TargetUnavailable
from s2dit_deploy.targets.mapped_runner import DeviceIORunner

from .chunks import device_parts, load_chained, merge_quant_summaries
from .convert import convert, device_stage, metadata_for, peak_rss_mb
from .options import CoreMLOptions

log = logging.getLogger(__name__)


class QuantSeamMissing(RuntimeError):
    """A QuantPlan was given but ``s2dit_deploy.quant.coreml.apply_plan`` is not available."""


def embedding_tables(module, plan: Any, stage_name: str) -> dict[str, Any]:
    """{plan layer: weight array} of the stage's embedding tables: an embedding looked up at constant
    indices (CLIP's position embedding) is folded by the converter into an anonymous constant, which
    the Core ML translation then finds by value."""
    import torch

    layers = list(getattr(plan, "stages", {}).get(stage_name, {}))
    out = {}
    for path, m in (module.named_modules() if module is not None else ()):
        if isinstance(m, torch.nn.Embedding):
            hit = next((n for n in layers if path == n or path.endswith("." + n)), None)
            if hit is not None:
                out[hit] = m.weight.detach().float().numpy()
    return out


def apply_quant_plan(mlmodel, plan: Any, stage_name: str, module=None):
    """Hand the model to the quantizer's Core ML backend; ``plan=None`` returns it unchanged."""
    if plan is None:
        return mlmodel, {}
    try:
        mod = importlib.import_module("s2dit_deploy.quant.coreml")
        fn = mod.apply_plan
    except (ModuleNotFoundError, AttributeError) as exc:
        raise QuantSeamMissing(
            "a QuantPlan was given but s2dit_deploy.quant.coreml.apply_plan(mlmodel, plan, stage_name) "
            "does not exist in this version; compile with quant=None"
        ) from exc
    tables = embedding_tables(module, plan, stage_name)
    out = fn(mlmodel, plan, stage_name, tables) if tables else fn(mlmodel, plan, stage_name)
    summary = {}
    if isinstance(out, tuple):
        out, summary = out
    elif hasattr(plan, "to_dict"):
        summary = {"plan": plan.to_dict()}
    return out, summary


# the Core ML runner is the shared device-I/O runner (kept under its old name)
CoreMLRunner = DeviceIORunner


class CoreMLTarget(BaseTarget):
    name = "coreml"
    options_cls = CoreMLOptions
    capabilities = frozenset()
    NUMERICS = {"fp16": "Core ML reference executor: fp16 rounding after every op, as the Neural Engine",
                "fp32": "Core ML reference executor: fp32 ops"}

    def float_stage(self, stage: Stage) -> Stage:
        """As is: the ANE rewrite shares the stored weights and ``device_parts`` promotes one
        chunk at a time to fp32 (a paper-scale DiT never exists whole in fp32)."""
        return stage

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any] | None = None) -> Artifact:
        opts = self.parse_options(options)
        t0 = time.time()
        dstage = device_stage(stage, opts)
        extra = {"quant": None if plan is None else getattr(plan, "name", None) or "plan"}
        files, summaries, node_blocks, pieces = [], [], {}, []
        for part, chunk in device_parts(stage, dstage, opts):
            meta_k = metadata_for(stage, dstage, opts, {**extra, **({"chunk": chunk} if chunk else {})})
            mlmodel = convert(part, opts, meta_k)
            node_blocks.update(part.node_blocks)
            mlmodel, summary = apply_quant_plan(mlmodel, plan, stage.name, stage.module)
            summaries.append(summary)
            k = len(files)
            mlmodel.short_description = f"s2dit {stage.name} ({dstage.layout})" + (f", chunk {k}" if chunk else "")
            fname = f"{stage.name}.{k}.mlpackage" if chunk else f"{stage.name}.mlpackage"
            mlmodel.save(str(Path(out_dir) / fname))
            files.append(fname)
            if chunk:
                pieces.append(chunk)
            del mlmodel, part  # one program's converter copies at a time
        dstage.node_blocks = node_blocks
        seconds = time.time() - t0
        log.info("coreml: %s compiled in %.1f s as %d program(s) (peak RSS %.0f MB)", stage.name, seconds,
                 len(files), peak_rss_mb())
        meta = {
            "layout": dstage.layout,
            "device_io": {"inputs": maps_to_json(dstage.inputs), "outputs": maps_to_json(dstage.outputs)},
            "options": json.loads(json.dumps({f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})),
            "deployment_target": opts.deployment_target,
            "compute_precision": opts.precision,
            "compute_units": opts.compute_units,
            "caches": "explicit inputs/outputs (see targets/coreml/convert.py)",
            "convert_seconds": round(seconds, 2),
        }
        if pieces:
            meta["chunks"] = pieces
        quant_summary = summaries[0] if len(summaries) == 1 else merge_quant_summaries(summaries)
        return Artifact(stage.name, self.name, files, stage.contract(), quant_summary, meta)

    def check_plan(self, artifact: Artifact, bundle_dir: Path, plan: Any) -> list[str]:
        """Quantized plan layers the translation found no weight for (from the quant summary)."""
        from s2dit_deploy.targets.floors import unmatched_plan_layers

        return unmatched_plan_layers(artifact, plan)

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool = False) -> CoreMLRunner:
        try:
            from s2dit_deploy.targets.coreml.executor import load_program
        except ImportError as exc:
            raise TargetUnavailable("the Core ML reference executor is not available in this version") from exc
        io = artifact.metadata["device_io"]
        if artifact.metadata.get("chunks"):
            program = load_chained(Path(bundle_dir), list(artifact.files), artifact.metadata["chunks"],
                                   [m["device_name"] for m in io["outputs"]])
        else:
            program = load_program(str(Path(bundle_dir) / artifact.files[0]))
        io_dtype = artifact.metadata.get("options", {}).get("io_dtype", "fp16")
        return CoreMLRunner(program, maps_from_json(io["inputs"]), maps_from_json(io["outputs"]), io_dtype)


TARGET = CoreMLTarget()
