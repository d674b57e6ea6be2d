"""The ``executorch-xnnpack`` target: stage -> torch.export -> XNNPACK-lowered ``.pte``.

Options (``targets/xnnpack/options.py``, ``sd.compile(..., **options)``): ``precision`` (fp32),
``xnnpack_quant`` (``none`` | ``int8`` | ``int8-dynamic`` | ``8da4w``, see quantize.py),
``calibration_batches`` (default 16), ``etrecord`` (also write ``<stage>.etrecord`` so profiles name
the delegated ops), ``external_weights`` (``auto`` | ``always`` | ``never``: the weights in a
``<stage>.ptd`` beside the ``.pte``, see external.py; auto above 1.5 GiB). ``calibration`` is
compiler context, not an option: real named inputs, ``{stage: [named inputs, ...]}`` (as
``s2dit_deploy.fidelity.record_inputs`` returns) or a list for the stage; ``XnnpackTarget.prepare``
records them from the float pipeline when needed.

A ``QuantPlan`` (``plan``) is translated by ``s2dit_deploy.quant.xnnpack.apply_plan``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from s2dit_deploy.bundle import Artifact, BundleError
from s2dit_deploy.quant.torchao_compat import import_torchao
from s2dit_deploy.stages import Stage

from .partition import delegation_stats, make_partitioner
from .passes import export_for_xnnpack, swap_conv3d, swap_layer_norm
from s2dit_deploy.targets.base import BaseTarget, TargetOptionError, parse_options

from .external import (backend_config, constant_bytes, tag_constants, unwrap_subclasses, use_external,
                       write_program)
from .options import EXTERNAL_WEIGHTS_BOUND, XnnpackOptions
from .quantize import SCHEMES, apply_quant_plan, quantize_module
from .runtime import XnnpackRunner

log = logging.getLogger(__name__)
# ExecuTorch imports torchao: import it first, without the warnings of its CUDA-only kernels
import_torchao()

NAME = "executorch-xnnpack"
DEFAULT_CALIBRATION_BATCHES = XnnpackOptions.calibration_batches
# disjoint from the validation prompt (s2dit_deploy.fidelity.DEFAULT_PROMPT)
CALIBRATION_PROMPTS = ("a red ball bouncing on a blue background",
                       "a blue square sliding across a white floor")


class XnnpackOptionError(TargetOptionError):
    """A compile option the XNNPACK target does not know, or a bad value for one."""


def _check_options(options: Any) -> XnnpackOptions:
    try:
        return parse_options(XnnpackOptions, options, NAME)
    except TargetOptionError as exc:
        raise XnnpackOptionError(str(exc)) from exc


def _calibration_batches(stage: Stage, calib: Any, n: int) -> list[tuple[torch.Tensor, ...]]:
    if isinstance(calib, dict):
        calib = calib.get(stage.name)
    if not calib:
        return []
    # spread the picks over the whole stream (early and late chunks, every step)
    k = min(n, len(calib))
    idx = sorted({round(i * (len(calib) - 1) / max(k - 1, 1)) for i in range(k)})
    return [tuple(torch.as_tensor(calib[i][name]) for name in stage.input_names) for i in idx]


class XnnpackTarget(BaseTarget):
    name = NAME
    options_cls = XnnpackOptions
    capabilities = frozenset({"profile", "etrecord", "timed_execute"})
    schemes = SCHEMES

    def parse_options(self, mapping: Any) -> XnnpackOptions:
        return _check_options(mapping)

    def prepare(self, pipe, plan: Any, stages: dict[str, Stage], options: dict[str, Any]) -> dict[str, Any]:
        """Options for ``compile`` with real calibration inputs recorded when the scheme needs them."""
        parsed = _check_options(options)
        opts = dict(options)
        if opts.get("calibration") is None and (plan is not None or parsed.xnnpack_quant == "int8"):
            from s2dit_deploy.recording import record_inputs

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
        scheme = opts.xnnpack_quant
        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        module, swapped = swap_conv3d(stage.module)
        norms = swap_layer_norm(module)
        module.eval()
        example = tuple(stage.example_inputs)
        batches = _calibration_batches(stage, (options or {}).get("calibration"), opts.calibration_batches)
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
        weight_bytes = constant_bytes(ep)
        tag = stage.name if use_external(opts.external_weights, weight_bytes) else None
        if tag is not None:
            ep = unwrap_subclasses(ep)
            tag_constants(ep, tag)
        t2 = time.perf_counter()
        dynamic = quant.get("scheme") in ("int8-dynamic",)
        edge = to_edge_transform_and_lower(ep, partitioner=[make_partitioner(dynamic=dynamic)],
                                           generate_etrecord=opts.etrecord)
        stats = delegation_stats(edge)
        if quant.get("scheme") != "none":
            # q/dq nodes left outside the delegate need the quantized kernels' out variants registered
            import executorch.kernels.quantized  # noqa: F401
        program = edge.to_executorch(backend_config(tag))
        t3 = time.perf_counter()
        written = write_program(program, out_dir, stage.name, tag)
        files = list(written["files"])
        if opts.etrecord:
            files.append(f"{stage.name}.etrecord")
            program.get_etrecord().save(str(out_dir / files[-1]))
        if stats["fallback_ops"]:
            log.info("%s: %d node(s) on portable CPU kernels: %s", stage.name, stats["portable_nodes"],
                     stats["fallback_ops"])
        import executorch

        meta = {
            "delegation": stats,
            "swaps": {"conv3d_as_conv2d": swapped, "layer_norm_as_linear": norms, "sdpa": "matmul+softmax"},
            "pte_bytes": written["pte_bytes"],
            "external_weights": {"policy": opts.external_weights, "external": tag is not None,
                                 "weight_bytes": weight_bytes, "auto_bound_bytes": EXTERNAL_WEIGHTS_BOUND,
                                 "ptd_bytes": written["ptd_bytes"]},
            "seconds": {"quantize": round(t1 - t0, 3), "export": round(t2 - t1, 3), "lower": round(t3 - t2, 3)},
            "executorch": getattr(executorch, "__version__", "unknown"),
            "runtime": "executorch.runtime (XnnpackBackend + portable kernels)",
            "compute_precision": opts.precision,
        }
        return Artifact(stage.name, NAME, files, stage.contract(), quant, meta)

    def check_plan(self, artifact: Artifact, bundle_dir: Path, plan: Any) -> list[str]:
        """Quantized plan layers the translation found no weight for (from the quant summary)."""
        from s2dit_deploy.targets.floors import unmatched_plan_layers

        return unmatched_plan_layers(artifact, plan)

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool = False) -> XnnpackRunner:
        pte = [f for f in artifact.files if f.endswith(".pte")]
        if not pte:
            raise FileNotFoundError(f"artifact {artifact.stage} lists no .pte file: {artifact.files}")
        ptd = [f for f in artifact.files if f.endswith(".ptd")]
        if len(ptd) > 1:
            raise BundleError(f"artifact {artifact.stage} lists {len(ptd)} .ptd files {ptd}; the ExecuTorch "
                              "runtime takes one data file per program, recompile the bundle")
        return XnnpackRunner(artifact.path(bundle_dir, artifact.files.index(pte[0])), artifact.contract,
                             data=artifact.path(bundle_dir, artifact.files.index(ptd[0])) if ptd else None)

    def etrecord(self, artifact: Artifact, bundle_dir: Path) -> Path | None:
        rec = [f for f in artifact.files if f.endswith(".etrecord")]
        return Path(bundle_dir) / rec[0] if rec else None


TARGET = XnnpackTarget()
