"""Stage -> Core ML ML program: ANE rewrite, ``torch.export``, ``coremltools.convert``, metadata.

Caches are explicit inputs/outputs, not ``ct.StateType``: the ``dit_step`` contract reads the cache
window on every denoising step but commits a chunk's entries only after the t = 0 pass
(Self-Forcing), so a state would need a conditional write (no control flow on the ANE) or a
two-function model; the window roll would also copy the whole window inside the graph. Explicit
I/O keeps one straight-line graph, lets the host roll the window with ``push_entries``, and keeps
every tensor checkable by the reference executor.

Run as a module to convert one stage and measure it::

    python -m s2dit_deploy.targets.coreml.convert s2dit-small --stage dit_step --out /tmp/x.mlpackage
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import resource
import time
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from s2dit_deploy.rewrites import DeviceStage, identity_stage, rewrite_stage
from s2dit_deploy.stages import Stage
from s2dit_deploy.targets.decompositions import VARIANCE, WHERE_SCALARS

from .options import CoreMLOptions  # noqa: F401 - re-exported (the options live in a light module)

log = logging.getLogger(__name__)

FORMAT_VERSION = "s2dit-coreml/1"


def device_stage(stage: Stage, opts: CoreMLOptions) -> DeviceStage:
    return rewrite_stage(stage, opts.ane()) if opts.rewrite else identity_stage(stage)


def export(dstage: DeviceStage) -> torch.export.ExportedProgram:
    with torch.no_grad():
        ep = torch.export.export(dstage.module.eval(), tuple(dstage.example_inputs), strict=False)
    ep = ep.run_decompositions(_DECOMPOSITIONS)
    _drop_aliases(ep)
    return ep


# ATen overloads coremltools 9.0 has no converter for, rewritten into ones it has.
_DECOMPOSITIONS = {**VARIANCE, **WHERE_SCALARS}


def _drop_aliases(ep: torch.export.ExportedProgram) -> None:
    """coremltools has no converter for ``aten.alias`` (transformers' CLIP emits one); it is a no-op."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.alias.default, torch.ops.aten.alias_copy.default):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    ep.graph_module.recompile()


def node_blocks(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """torch node name -> DiT block (``groups.N.branch.J``) from the export's module stacks."""
    from s2dit_deploy.analysis.ane_residency import block_of

    out = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [v[0] for v in stack.values()]
        for path in reversed(paths):
            blk = block_of(path, None)
            if blk != "other":
                out[node.name] = blk
                break
    return out


def _tensor_type(ct, name, shape, example: torch.Tensor, io_dtype: str):
    if example.is_floating_point():
        dtype = np.float16 if io_dtype == "fp16" else np.float32
    else:
        dtype = np.int32
    return ct.TensorType(name=name, shape=tuple(shape), dtype=dtype)


def convert(dstage: DeviceStage, opts: CoreMLOptions, metadata: dict[str, str] | None = None):
    """The MLModel (not saved) of a device stage; I/O named by the stage's ``IOMap.device_name``."""
    import coremltools as ct

    t0 = time.time()
    ep = export(dstage)
    dstage.node_blocks = node_blocks(ep)
    log.info("%s: torch.export %.1f s", dstage.name, time.time() - t0)
    inputs = [_tensor_type(ct, m.device_name, m.device_shape, ex, opts.io_dtype)
              for m, ex in zip(dstage.inputs, dstage.example_inputs)]
    fdt = np.float16 if opts.io_dtype == "fp16" else np.float32
    outputs = [ct.TensorType(name=m.device_name, dtype=fdt if dt.startswith("float") else np.int32)
               for m, dt in zip(dstage.outputs, dstage.output_dtypes)]
    t1 = time.time()
    mlmodel = ct.convert(
        ep,
        inputs=inputs,
        outputs=outputs,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, opts.deployment_target),
        compute_precision=ct.precision.FLOAT16 if opts.precision == "fp16" else ct.precision.FLOAT32,
        compute_units=getattr(ct.ComputeUnit, opts.compute_units),
        skip_model_load=True,
    )
    log.info("%s: coremltools.convert %.1f s", dstage.name, time.time() - t1)
    for k, v in (metadata or {}).items():
        mlmodel.user_defined_metadata[k] = v
    return mlmodel


def metadata_for(stage: Stage, dstage: DeviceStage, opts: CoreMLOptions, extra: dict[str, Any] | None = None) -> dict[str, str]:
    from s2dit_deploy.rewrites.device_io import maps_to_json

    io = {"inputs": maps_to_json(dstage.inputs), "outputs": maps_to_json(dstage.outputs)}
    meta = {
        "s2dit.version": FORMAT_VERSION,
        "s2dit.stage": stage.name,
        "s2dit.layout": dstage.layout,
        "s2dit.schedule": json.dumps(list(opts.fold_schedule) if opts.fold_schedule else None),
        "s2dit.contract": json.dumps(stage.contract()),
        "s2dit.device_io": json.dumps(io),
        "s2dit.options": json.dumps({f.name: getattr(opts, f.name) for f in fields(opts)}),
    }
    try:
        from importlib.metadata import version

        meta["s2dit.package_version"] = version("s2dit-deploy")
    except Exception as exc:  # noqa: BLE001 - metadata only
        log.debug("package version unknown: %s", exc)
    meta.update({f"s2dit.{k}": json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    from s2dit_deploy.stages import build_stages

    p = argparse.ArgumentParser(description="convert one stage to Core ML and report time / memory / ANE residency")
    p.add_argument("model")
    p.add_argument("--stage", default="dit_step")
    p.add_argument("--resolution", default=None, help="HxW override, e.g. 288x512")
    p.add_argument("--dim", type=int, default=None, help="reduced DiT width (same layout and head size)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help=".mlpackage path to save")
    p.add_argument("--residency", default=None, help="write the ANE residency report here (.json + .md)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")
    opts = CoreMLOptions.from_dict(dict(kv.split("=", 1) for kv in args.option))
    t0 = time.time()
    res = tuple(int(v) for v in args.resolution.split("x")) if args.resolution else None
    pipe = _pipeline(args.model, args.stage, res, args.dim)
    stage = build_stages(pipe, (args.stage,))[args.stage]
    build_s = time.time() - t0
    t1 = time.time()
    dstage = device_stage(stage, opts)
    mlmodel = convert(dstage, opts, metadata_for(stage, dstage, opts))
    if args.out:
        mlmodel.save(args.out)
    conv_s = time.time() - t1
    result = {"model": args.model, "stage": args.stage, "options": opts.__dict__, "build_s": round(build_s, 1),
              "convert_s": round(conv_s, 1), "peak_rss_mb": round(peak_rss_mb())}
    if args.residency:
        from s2dit_deploy.analysis.ane_residency import analyze, write_report

        report = analyze(mlmodel._mil_program, title=f"{args.model} {args.stage} rewrite={opts.rewrite}",
                         node_blocks=dstage.node_blocks)
        write_report(report, args.residency)
        result["residency"] = report["summary"]
    # this module's CLI output: one JSON line with --json, indented otherwise
    sys.stdout.write(json.dumps(result, default=str, indent=None if args.json else 1) + "\n")
    return 0


def _pipeline(name: str, stage: str, resolution: tuple[int, int] | None, dim: int | None):
    """A pipeline holding only the module ``stage`` needs (seeded init; RAM matters for mobile)."""
    import dataclasses

    from s2dit_deploy.model_zoo.pipeline import Pipeline
    from s2dit_deploy.model_zoo.registry import load_stage, resolve

    cfg, folder = resolve(name)
    if resolution:
        cfg = cfg.with_resolution(*resolution)
    if dim:  # reduced-width variant of the same architecture (same layout, heads of the same size)
        heads = max(1, dim // cfg.dit.head_dim)
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(
            cfg.dit, dim=dim, num_heads=heads, ffn_dim=cfg.dit.ffn_dim * dim // cfg.dit.dim,
            attn_dim=heads * cfg.dit.head_dim if cfg.dit.attn_dim else 0))
        folder = None
    need = {"text_encoder": "text_encoder", "dit_step": "dit", "decoder": "decoder"}[stage]
    mods = {s: load_stage(cfg, folder, s) if s == need else None for s in ("text_encoder", "dit", "decoder")}
    return Pipeline(cfg, mods["text_encoder"], mods["dit"], mods["decoder"])


if __name__ == "__main__":
    raise SystemExit(main())
