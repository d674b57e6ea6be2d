"""``onnx-qnn`` target: QDQ ONNX models compiled to QNN context binaries (EPContext) for one SoC.

Per stage: the QNN rewrites of ``targets/qnn/rewrite.py`` (depthwise Conv3d as conv2d taps,
rank-5 unpatchify, explicit attention, host timestep features) -> export (opset 20, static) ->
``qnn_preprocess_model`` (LayerNorm fusion) -> node-owned biases (``clean_biases``) -> static QDQ
quantization calibrated on recorded real stage inputs (``get_qnn_qdq_config``) -> a session on the
QNN EP with ``soc_model``/``htp_arch`` and no CPU fallback dumps the EPContext model (the context
binary embedded). The bundle keeps both: ``<stage>.<soc>.ctx.onnx`` (what an app with ONNX Runtime
Mobile + QNN EP loads on the phone) and ``<stage>.<soc>.qdq.onnx`` (portable QDQ source).

Options (``targets/onnx/options.py``): ``soc`` (default SM8750), ``precision`` (compute precision of
float ops: fp16), ``onnx_exporter``, ``calibration_samples``, ``external_weights`` (the QDQ model's
weights in ``<qdq>.onnx.data``, and the context binary in ``<ctx stem>_qnn.bin`` beside the
EPContext model, ``embed_mode=0``; ORT reads the QDQ model's external data when it builds the
context, and the EPContext model itself then holds no weights, only the binary's file name).
Quantization comes from ``--quant``: ``8a8w`` (the documented default when no ``--quant`` is given:
uint8 activations, int8 symmetric per-channel weights), ``16a8w`` (uint16 activations) or a
QuantPlan; the HTP path through the QNN EP runs a QDQ graph, so there is no float build. Calibration
comes from the compiler's ``pipeline`` or a ``calibration`` mapping, as for executorch-qnn.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2dit_deploy.targets.qnn.calibration import calibration_args
from s2dit_deploy.targets.qnn.rewrite import apply_host_inputs, rewrite_for_qnn

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.stages import Stage, TensorSpec

from s2dit_deploy.targets.base import BaseTarget, QuantPreset, TargetOptionError

from . import ort_qnn
from .export import OrtRunner, build_folder, export_stage, stage_weight_bytes, want_external
from .external import PROTOBUF_LIMIT, check_model_files, context_binaries, externalize
from .options import DEFAULT_QUANT, EXTERNAL_WEIGHTS_BOUND, QUANT_PRESETS, OnnxQnnOptions
from .qdq import quantize_qdq

log = logging.getLogger(__name__)

DEFAULT_SOC = OnnxQnnOptions.soc
PRECISIONS = QUANT_PRESETS


def sqrt_to_pow(path: Path) -> int:
    """Rewrite ``Sqrt(x)`` as ``Pow(x, 0.5)`` in place (same numbers). HTP rejects quantized Sqrt
    on rank-5 tensors (backendValidateOpConfig error 3110, e.g. the decoder's per-frame GroupNorm)
    but takes Pow."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "Sqrt"]
    if not nodes:
        return 0
    half = "s2dit_sqrt_exponent"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), half))
    for n in nodes:
        pw = helper.make_node("Pow", [n.input[0], half], list(n.output), name=n.name + "_as_pow")
        idx = list(model.graph.node).index(n)
        model.graph.node.remove(n)
        model.graph.node.insert(idx, pw)
    onnx.save(model, str(path))
    return len(nodes)


def _lift(model, tensor, name: str) -> None:
    """Add a copy of ``tensor`` as initializer ``name``."""
    import onnx

    lifted = onnx.TensorProto()
    lifted.CopyFrom(tensor)
    lifted.name = name
    model.graph.initializer.append(lifted)


def clean_biases(path: Path) -> int:
    """Make every Conv / Gemm / LayerNorm bias a node-owned initializer, in place (same numbers);
    returns how many nodes changed.

    ONNX Runtime's QNN QDQ config quantizes a bias that is not an initializer of its own (the
    exporter writes zeros as Constant nodes and equal tensors as Identity nodes of one initializer)
    like an activation, with a run-time QuantizeLinear; the QNN EP then rejects the weight's
    DequantizeLinear and the whole Conv falls out of the HTP graph. So: Constant and
    Identity-of-initializer nodes become initializers, all-zero Conv / LayerNorm biases are dropped
    (both ops default to no bias) and shared biases get one copy per node.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    changed = 0
    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            source = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in inits:
            source = inits[node.input[0]]
        else:
            continue
        _lift(model, source, node.output[0])
        inits[node.output[0]] = model.graph.initializer[-1]
        model.graph.node.remove(node)
        changed += 1
    uses = Counter(name for n in model.graph.node for name in n.input)
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "ConvTranspose", "LayerNormalization") or len(node.input) < 3 \
                or node.input[2] not in inits:
            continue
        bias = node.input[2]
        if node.op_type in ("Conv", "LayerNormalization") and not np.any(numpy_helper.to_array(inits[bias])):
            del node.input[2]
        elif uses[bias] > 1:
            uses[bias] -= 1
            node.input[2] = f"{bias}__{node.name or changed}"
            _lift(model, inits[bias], node.input[2])
        else:
            continue
        changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def compile_context(qdq_model: Path, ctx_model: Path, soc: str, fp16: bool = False,
                    embed: bool = True) -> dict[str, Any]:
    """Run the QNN EP once with EPContext dumping on; returns partition facts of the result
    (with ``context_files``: the binaries written beside ``ctx_model`` when not ``embed``)."""
    import onnxruntime as ort

    extra = {"enable_htp_fp16_precision": "1"} if fp16 else None
    so = ort_qnn.session_options(soc, ep_context_file=ctx_model, extra=extra, embed_context=embed)
    try:
        ort.InferenceSession(str(qdq_model), so)
    except Exception as exc:
        rejected = diagnose(qdq_model, soc, extra)
        lines = "\n".join(f"  {r['op']} x{r['count']}: {r['reason']}" for r in rejected) or "  (no detail)"
        raise RuntimeError(
            f"QNN EP could not take the whole graph of {qdq_model.name} for {soc} (CPU fallback is "
            f"disabled); nodes QNN rejected:\n{lines}") from exc
    src, ctx = _ops(qdq_model), _ops(ctx_model)
    compute = {k: v for k, v in src.items() if k not in ("QuantizeLinear", "DequantizeLinear")}
    left = {k: v for k, v in ctx.items() if k != "EPContext"}
    total = sum(compute.values())
    bins = context_binaries(ctx_model)
    missing = [b for b in bins if not (ctx_model.parent / b).is_file()]
    if missing:
        raise RuntimeError(f"{ctx_model.name} names context binaries {missing} that the QNN EP did not write")
    return {"delegated_ops": total - sum(left.values()), "total_ops": total, "context_files": bins,
            "delegated_fraction": round((total - sum(left.values())) / total, 4) if total else 1.0,
            "qnn_subgraphs": ctx.get("EPContext", 0), "delegated_by_op": dict(sorted(compute.items())),
            "fallbacks": [{"op": k, "count": v, "reason": "left outside the EPContext node"}
                          for k, v in sorted(left.items())]}


def diagnose(model: Path, soc: str, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Nodes the QNN EP leaves to the CPU, by op type, with QNN's validation messages."""
    import re

    import onnxruntime as ort
    from s2dit_deploy.targets.qnn.lower import native_output

    so = ort_qnn.session_options(soc, extra=extra)
    so.log_severity_level = 2
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    native: list[str] = []
    with native_output(native):
        sess = ort.InferenceSession(str(model), so)
    reasons: dict[str, set] = {}
    for line in native:
        m = re.search(r"failed for node `([^`]*)` of type `([^`]*)`(.*)", line)
        if m:
            reasons.setdefault(m.group(1), set()).add(f"QNN {m.group(2)} {m.group(3).strip()}")
    names = {n.name: n.op_type for n in __import__("onnx").load(str(model), load_external_data=False).graph.node}
    cpu: Counter = Counter()
    why: dict[str, set] = {}
    for sg in sess.get_provider_graph_assignment_info():
        if sg.ep_name == ort_qnn.EP_NAME:
            continue
        for node in sg.get_nodes():
            name = getattr(node, "name", str(node))
            op = getattr(node, "op_type", None) or names.get(name, "?")
            if op in ("QuantizeLinear", "DequantizeLinear"):
                continue
            cpu[op] += 1
            why.setdefault(op, set()).update(reasons.get(name, {"not claimed by the QNN EP"}))
    return [{"op": op, "count": n, "reason": "; ".join(sorted(why[op]))[:400]} for op, n in sorted(cpu.items())]


class OnnxQnnRunner(OrtRunner):
    """Runs an EPContext model on the QNN EP (HTP emulation on x86), optionally profiling.

    ``host_inputs`` are the host-side input transforms of the QNN rewrites (``t`` -> fp32
    timestep features); ``graph_inputs`` the specs of what the graph then takes.
    """

    def __init__(self, path: Path, contract: dict[str, Any], soc: str, fp16: bool = False,
                 profile_csv: Path | None = None, host_inputs: dict[str, Any] | None = None,
                 graph_inputs: list[dict[str, Any]] | None = None):
        extra = {"enable_htp_fp16_precision": "1"} if fp16 else None
        import onnxruntime as ort

        so = ort_qnn.session_options(soc, profile_csv=profile_csv, extra=extra)
        graph_contract = {**contract, "inputs": graph_inputs} if graph_inputs else contract
        super().__init__(path, graph_contract, session=ort.InferenceSession(str(path), so))
        self.profile_csv = profile_csv
        self.host_inputs = host_inputs or {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.host_inputs:
            named = apply_host_inputs(self.host_inputs, dict(inputs))
            inputs = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in named.items()}
        return super().run(inputs)


def qnn_graph_stage(stage: Stage) -> tuple[Stage, dict[str, int], dict[str, Any]]:
    """The stage as the HTP graph takes it: the QNN rewrites (``targets/qnn/rewrite.py``) applied."""
    module, example, rewrites, host = rewrite_for_qnn(stage.module, stage.example_inputs, stage.input_names)
    specs = tuple(TensorSpec.of(n, a) for n, a in zip(stage.input_names, example))
    return dataclasses.replace(stage, module=module, example_inputs=example, inputs=specs), rewrites, host


def _quant_choice(plan: Any) -> tuple[str, Any]:
    """(QDQ preset, QuantPlan or None) from what ``--quant`` resolved to; no ``--quant``: 8a8w."""
    if plan is None:
        log.info("onnx-qnn: no --quant given; building the default %s QDQ graph", DEFAULT_QUANT)
        return DEFAULT_QUANT, None
    if isinstance(plan, (QuantPreset, str)):
        name = plan.name if isinstance(plan, QuantPreset) else plan
        if name not in QUANT_PRESETS:
            raise TargetOptionError(f"--quant {name!r} is not an onnx-qnn preset; use one of "
                                    f"{', '.join(QUANT_PRESETS)} or a QuantPlan")
        return name, None
    return "plan", plan


class OnnxQnnTarget(BaseTarget):
    name = "onnx-qnn"
    options_cls = OnnxQnnOptions
    capabilities = frozenset({"quant_presets"})

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        opts = self.parse_options(options)
        soc = opts.soc
        ort_qnn.resolve_soc(soc)
        precision, qplan = _quant_choice(plan)
        options = {**dict(options or {}), "calibration_samples": opts.calibration_samples}
        ort_qnn.register()
        out_dir = Path(out_dir)
        ctx_rel, qdq_rel = f"{stage.name}.{soc.lower()}.ctx.onnx", f"{stage.name}.{soc.lower()}.qdq.onnx"
        t0 = time.perf_counter()
        graph_stage, rewrites, host = qnn_graph_stage(stage)
        external = want_external(opts.external_weights, graph_stage)
        with build_folder(out_dir, stage.name) as tmp:  # inside the partial, never the system temp
            # the preprocessing below rewrites the float model in memory: one protobuf below 2 GiB
            graph = export_stage(graph_stage, tmp / "float.onnx", opts.onnx_exporter,
                                 external=stage_weight_bytes(graph_stage) >= PROTOBUF_LIMIT)
            from onnxruntime.quantization.execution_providers.qnn import (
                qnn_preprocess_model,
            )

            pre = tmp / "pre.onnx"
            if not qnn_preprocess_model(str(tmp / "float.onnx"), str(pre), fuse_layernorm=True):
                pre = tmp / "float.onnx"
            graph["rewrites"] = {**rewrites, "sqrt_to_pow": sqrt_to_pow(pre), "clean_biases": clean_biases(pre)}
            # always a QDQ graph (see the module docstring)
            names = set(graph["inputs"])
            args = calibration_args(stage, options)
            named = [apply_host_inputs(host, dict(zip(stage.input_names, t))) for t in args]
            samples = [{n: torch.as_tensor(a).numpy() for n, a in s.items() if n in names} for s in named]
            quant = quantize_qdq(pre, tmp / qdq_rel, samples, precision, qplan, graph_stage)
            if external:
                ext = externalize(tmp / qdq_rel, out_dir / qdq_rel)
            else:
                ext = None
                (tmp / qdq_rel).replace(out_dir / qdq_rel)
        quant.setdefault("preset", precision if qplan is None else None)
        part = compile_context(out_dir / qdq_rel, out_dir / ctx_rel, soc, fp16=False, embed=not external)
        files = [ctx_rel, qdq_rel, *part["context_files"], *([ext["data_file"]] if ext else [])]
        seconds = round(time.perf_counter() - t0, 2)
        log.info("%s: %d/%d ONNX ops in QNN context binaries (%s, %s) in %.1fs", stage.name,
                 part["delegated_ops"], part["total_ops"], soc, precision, seconds)
        soc_model, arch = ort_qnn.resolve_soc(soc)
        return Artifact(stage=stage.name, target=self.name, files=files, contract=stage.contract(),
                        quant={**quant, "soc": soc},
                        metadata={"soc": soc, "soc_model": soc_model, "htp_arch": arch,
                                  "compute_precision": opts.precision, "use_fp16": False,
                                  "quant": precision if qplan is None else getattr(qplan, "name", "plan"),
                                  "graph": graph, "partition": part, "compile_seconds": seconds,
                                  "external_weights": {"policy": opts.external_weights, "external": external,
                                                       "weight_bytes": stage_weight_bytes(graph_stage),
                                                       "auto_bound_bytes": EXTERNAL_WEIGHTS_BOUND,
                                                       "context_files": part["context_files"], **(ext or {})},
                                  "host_inputs": host, "graph_inputs": graph_stage.contract()["inputs"],
                                  "runtime": "onnxruntime + QNN EP (HTP emulation here, Hexagon on device)"})

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool = False,
             profile_csv: Path | None = None) -> OnnxQnnRunner:
        meta = artifact.metadata
        check_model_files(artifact, bundle_dir)
        return OnnxQnnRunner(artifact.path(bundle_dir, 0), artifact.contract, meta["soc"],
                             fp16=meta.get("precision") == "fp16", profile_csv=profile_csv,
                             host_inputs=meta.get("host_inputs"), graph_inputs=meta.get("graph_inputs"))


TARGET = OnnxQnnTarget()
