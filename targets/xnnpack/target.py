"""The ``executorch-xnnpack`` target: stage -> torch.export -> XNNPACK-lowered ``.pte``.

Options (``sd.compile(..., **options)``):
- ``xnnpack_quant``: ``none`` (fp32, default) | ``int8`` | ``int8-dynamic`` | ``8da4w`` (see quantize.py).
- ``calibration``: real named inputs for static int8, either ``{stage: [named inputs, ...]}`` (as
  ``s2dit_deploy.fidelity.record_inputs`` returns) or a list for the stage being compiled.
  ``XnnpackTarget.prepare`` records them from the float pipeline when the scheme needs them.
- ``calibration_batches``: at most this many calibration calls per stage (default 16).
- ``etrecord``: also write ``<stage>.etrecord`` so profiles name the delegated ops (default False).

A ``QuantPlan`` (``plan``) is translated by ``s2dit_deploy.quant.xnnpack.apply_plan``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.stages import Stage

from .partition import delegation_stats, make_partitioner
from .passes import export_for_xnnpack, swap_conv3d, swap_layer_norm
from .quantize import SCHEMES, QuantSchemeError, apply_quant_plan, check_scheme, quantize_module
from .runtime import XnnpackRunner

log = logging.getLogger(__name__)

NAME = "executorch-xnnpack"
OPTIONS = ("xnnpack_quant", "calibration", "calibration_batches", "etrecord", "pipeline")
DEFAULT_CALIBRATION_BATCHES = 16
# disjoint from the validation prompt (s2dit_deploy.fidelity.DEFAULT_PROMPT)
CALIBRATION_PROMPTS = ("a red ball bouncing on a blue background",
                       "a blue square sliding across a white floor")


class XnnpackOptionError(ValueError):
    """A compile option the XNNPACK target does not know, or a bad value for one."""


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k, v in options.items() if k not in OPTIONS and v is not None)
    if unknown:
        raise XnnpackOptionError(f"{NAME} does not take option(s) {unknown}; it takes {', '.join(OPTIONS)}")
    opts = dict(options)
    try:
        opts["xnnpack_quant"] = check_scheme(str(opts.get("xnnpack_quant") or "none"))
    except QuantSchemeError as exc:
        raise XnnpackOptionError(str(exc)) from exc
    n = opts.get("calibration_batches")
    n = DEFAULT_CALIBRATION_BATCHES if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise XnnpackOptionError(f"calibration_batches must be a positive int, got {n!r}")
    opts["calibration_batches"] = n
    return opts


def _calibration_batches(stage: Stage, options: dict[str, Any]) -> list[tuple[torch.Tensor, ...]]:
    calib = options.get("calibration")
    if isinstance(calib, dict):
        calib = calib.get(stage.name)
    if not calib:
        return []
    n = options["calibration_batches"]
    # spread the picks over the whole stream (early and late chunks, every step)
    k = min(n, len(calib))
    idx = sorted({round(i * (len(calib) - 1) / max(k - 1, 1)) for i in range(k)})
    return [tuple(torch.as_tensor(calib[i][name]) for name in stage.input_names) for i in idx]


class XnnpackTarget:
    name = NAME
    schemes = SCHEMES

    def prepare(self, pipe, plan: Any, stages: dict[str, Stage], options: dict[str, Any]) -> dict[str, Any]:
        """Options for ``compile`` with real calibration inputs recorded when the scheme needs them."""
        opts = _check_options(options)
        if opts.get("calibration") is None and (plan is not None or opts["xnnpack_quant"] == "int8"):
            from s2dit_deploy.fidelity import record_inputs

            calls: dict[str, list] = {}
            for seed, prompt in enumerate(CALIBRATION_PROMPTS):
                rec = record_inputs(pipe, prompt, num_chunks=2, steps=pipe.config.steps, seed=seed)
                for k, v in rec.items():
                    calls.setdefault(k, []).extend(v)
            log.info("recorded calibration inputs: %s", {k: len(v) for k, v in calls.items()})
            opts["calibration"] = calls
        return opts

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        from executorch.exir import to_edge_transform_and_lower

        opts = _check_options(options)
        scheme = opts["xnnpack_quant"]
        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        module, swapped = swap_conv3d(stage.module)
        norms = swap_layer_norm(module)
        module.eval()
        example = tuple(stage.example_inputs)
        batches = _calibration_batches(stage, opts)
        if plan is not None:
            module, quant = apply_quant_plan(plan, stage, module, example, batches)
        else:
            if scheme == "int8" and not batches:
                log.warning("%s: no calibration inputs given; calibrating int8 on the stage's example inputs "
                            "only (compile through sd.compile, or pass calibration=record_inputs(...))", stage.name)
                batches = [example]
            module, quant = quantize_module(module, scheme, example, batches)
        t1 = time.perf_counter()
        ep = export_for_xnnpack(module, example)
        t2 = time.perf_counter()
        dynamic = quant.get("scheme") in ("int8-dynamic",)
        edge = to_edge_transform_and_lower(ep, partitioner=[make_partitioner(dynamic=dynamic)],
                                           generate_etrecord=bool(opts.get("etrecord")))
        stats = delegation_stats(edge)
        if quant.get("scheme") != "none":
            # q/dq nodes left outside the delegate need the quantized kernels' out variants registered
            import executorch.kernels.quantized  # noqa: F401
        program = edge.to_executorch()
        t3 = time.perf_counter()
        files = [f"{stage.name}.pte"]
        (out_dir / files[0]).write_bytes(program.buffer)
        if opts.get("etrecord"):
            files.append(f"{stage.name}.etrecord")
            program.get_etrecord().save(str(out_dir / files[1]))
        if stats["fallback_ops"]:
            log.info("%s: %d node(s) on portable CPU kernels: %s", stage.name, stats["portable_nodes"],
                     stats["fallback_ops"])
        import executorch

        meta = {
            "delegation": stats,
            "swaps": {"conv3d_as_conv2d": swapped, "layer_norm_as_linear": norms, "sdpa": "matmul+softmax"},
            "pte_bytes": len(program.buffer),
            "seconds": {"quantize": round(t1 - t0, 3), "export": round(t2 - t1, 3), "lower": round(t3 - t2, 3)},
            "executorch": getattr(executorch, "__version__", "unknown"),
            "runtime": "executorch.runtime (XnnpackBackend + portable kernels)",
        }
        return Artifact(stage.name, NAME, files, stage.contract(), quant, meta)

    def load(self, artifact: Artifact, bundle_dir: Path) -> XnnpackRunner:
        pte = [f for f in artifact.files if f.endswith(".pte")]
        if not pte:
            raise FileNotFoundError(f"artifact {artifact.stage} lists no .pte file: {artifact.files}")
        return XnnpackRunner(Path(bundle_dir) / pte[0], artifact.contract)

    def etrecord(self, artifact: Artifact, bundle_dir: Path) -> Path | None:
        rec = [f for f in artifact.files if f.endswith(".etrecord")]
        return Path(bundle_dir) / rec[0] if rec else None


TARGET = XnnpackTarget()
