"""``executorch-qnn`` target: one ExecuTorch ``.pte`` per stage, delegated to QNN HTP for one SoC.

Options (``targets/qnn/options.py``; ``sd.compile(..., target="executorch-qnn", soc="SM8750")``):
``soc``, ``precision`` (compute precision of float ops: fp16), ``profile`` (QNN detailed profiling
so ``bench`` reports HTP emulator events), ``act_observer``, ``calibration_samples``.
Quantization comes from ``--quant``: a QuantPlan (``s2dit_deploy.quant.qnn.apply_plan``) or a PT2E
preset ``8a8w``, ``16a8w``, ``16a4w``, ``8a4w``, ``16a16w`` (per-channel weights), which the
compiler hands over as a :class:`~s2dit_deploy.targets.base.QuantPreset`. Calibration inputs come
from the compiler's ``pipeline`` (its stream is recorded) or a ``calibration`` mapping.

Every stage compiles: what HTP rejects runs on XNNPACK or ExecuTorch's portable CPU kernels inside
the same ``.pte`` (``partition.py``), and ``metadata["placement"]`` records the share of ops and
FLOPs on each and why each op fell back (``placement.py``).

``load`` runs the ``.pte`` through ``executorch.runtime`` on this x86 machine; the QNN HTP library
emulates the NPU (numerics are HTP's, timings are not a phone's).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.quant.torchao_compat import import_torchao
from s2dit_deploy.stages import Stage

from s2dit_deploy.targets.base import BaseTarget, QuantPreset, Runner, TargetOptionError

from .calibration import calibration_args
from .libs import classify_native, ensure_qnn
from .lower import PRECISIONS, htp_arch, lower, native_output
from .options import QnnOptions
from .rewrite import apply_host_inputs, rewrite_for_qnn

log = logging.getLogger(__name__)
# ExecuTorch imports torchao: import it first, without the warnings of its CUDA-only kernels
import_torchao()

DEFAULT_SOC = QnnOptions.soc
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


def _surface_native(lines: list[str], what: str) -> None:
    """Real native QNN errors/warnings go to the log's warning channel; known-harmless ones to debug."""
    real, harmless = classify_native(lines)
    for h in harmless:
        log.debug("%s: harmless QNN message (%s): %s", what, h["reason"], h["message"])
    for line in real:
        if "[ERROR]" in line or "<E>" in line or "[WARNING]" in line or "<W>" in line:
            log.warning("%s: QNN: %s", what, line.strip())


class QnnRunner(Runner):
    """Runs a QNN-delegated ``.pte`` under HTP emulation with named numpy I/O.

    ``profiling`` says whether it was loaded with ETDump on; ``profile()`` (the declared
    capability) runs and returns the QNN emulator events.
    """

    label = "HTP emulator time on the x86 host, not phone time"

    def __init__(self, path: Path, contract: dict[str, Any], profile: bool = False,
                 host_inputs: dict[str, Any] | None = None):
        self.libs = ensure_qnn()
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.inputs = contract["inputs"]
        self.output_names = [s["name"] for s in contract["outputs"]]
        self.profiling = profile
        self.capabilities = frozenset({"profile"}) if profile else frozenset()
        self.host_inputs = host_inputs or {}
        native: list[str] = []
        with native_output(native):
            self._program = Runtime.get().load_program(self.path, enable_etdump=profile)
            self._method = self._program.load_method("forward")
        _surface_native(native, self.path.name)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [s["name"] for s in self.inputs if s["name"] not in inputs]
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {missing}")
        named = {s["name"]: torch.from_numpy(np.ascontiguousarray(inputs[s["name"]], dtype=_NP.get(s["dtype"], np.float32)))
                 .reshape(s["shape"]) for s in self.inputs}
        args = list(apply_host_inputs(self.host_inputs, named).values())
        outs = self._method.execute(args)
        return {n: o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o)
                for n, o in zip(self.output_names, outs)}

    def emulator_profile(self, work_dir: Path) -> list[dict[str, Any]]:
        """QNN profiling events of the last run (HTP *emulator* cycles, never phone time)."""
        if not self.profiling:
            raise RuntimeError("load the artifact with profile=True (compiled with profile=True)")
        from .profiling import read_events

        return read_events(self._program, Path(work_dir))

    def profile(self, inputs: dict[str, np.ndarray], runs: int = 3, etrecord: Path | None = None,
                keep_dir: Path | None = None) -> dict[str, Any]:
        """``runs`` executions, then the QNN events as a bench profile (emulator counters, not ms)."""
        import tempfile

        from .profiling import summarize_events

        for _ in range(max(runs, 1)):
            self.run(inputs)
        with tempfile.TemporaryDirectory(prefix="s2dit-qnn-prof-") as tmp:
            events = self.emulator_profile(Path(keep_dir) if keep_dir else Path(tmp))
        return summarize_events(events, runs)


def _quant_choice(plan: Any) -> tuple[str, Any]:
    """(PT2E preset or "fp16", QuantPlan or None) from what the compiler resolved ``--quant`` to."""
    if plan is None:
        return "fp16", None
    if isinstance(plan, QuantPreset) or isinstance(plan, str):
        name = plan.name if isinstance(plan, QuantPreset) else plan
        if name not in PRECISIONS or name == "fp16":
            raise TargetOptionError(f"--quant {name!r} is not a QNN preset; use one of "
                                    f"{', '.join(QnnOptions.QUANT_PRESETS)} or a QuantPlan")
        return name, None
    return "fp16", plan


class QnnTarget(BaseTarget):
    name = "executorch-qnn"
    options_cls = QnnOptions
    capabilities = frozenset({"profile", "quant_presets"})

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        opts = self.parse_options(options)  # soc, precision, act_observer checked before any work
        preset, qplan = _quant_choice(plan)
        calib = None
        if qplan is not None or preset != "fp16":
            calib = calibration_args(stage, {**dict(options or {}), "calibration_samples": opts.calibration_samples})
        t0 = time.perf_counter()
        low = lower(stage.module, stage.example_inputs, stage.input_names, opts.soc, preset, qplan, calib,
                    opts.profile, stage, opts.act_observer)
        seconds = time.perf_counter() - t0
        rel = f"{stage.name}.{opts.soc.lower()}.pte"
        (Path(out_dir) / rel).write_bytes(low.program)
        libs = ensure_qnn()
        part = low.partition
        quant_label = preset if qplan is None else getattr(qplan, "name", "plan")
        pl = low.placement
        log.info("%s: ops on HTP/XNNPACK/CPU %d/%d/%d, %.1f%% of FLOPs on HTP (%s, %s) in %.1fs", stage.name,
                 pl["ops"]["htp"], pl["ops"]["xnnpack"], pl["ops"]["cpu"], 100 * pl["flop_share_accelerator"],
                 opts.soc, quant_label, seconds)
        quantized = not low.quant["use_fp16"]
        return Artifact(
            stage=stage.name, target=self.name, files=[rel], contract=stage.contract(),
            quant=low.quant,
            metadata={"soc": opts.soc, "htp_arch": htp_arch(opts.soc),
                      "compute_precision": None if quantized else opts.precision,
                      "precision": low.quant["precision"], "quant": quant_label if quantized else None,
                      "use_fp16": low.quant["use_fp16"], "profile": opts.profile,
                      "partition": part, "placement": low.placement, "rewrites": low.rewrites,
                      "host_inputs": low.host_inputs, "qnn_libraries": libs.to_dict(),
                      "lower_seconds": round(seconds, 2),
                      "runtime": "executorch.runtime + QNN HTP (x86 emulation here, Hexagon on device)"},
        )

    def shard_count(self, stage: Stage, plan: Any, options: dict[str, Any]) -> int:
        """``shards`` when set, else the fewest shards whose weights fit ``shard_mb`` at the width
        the preset stores them (fp16 2 bytes, 8-bit 1, 4-bit 0.5)."""
        from s2dit_deploy.targets.sharding import auto_shards

        opts = self.parse_options(options)
        if stage.name != "dit_step":
            return 1
        if opts.shards:
            return opts.shards
        preset, _ = _quant_choice(plan)
        width = {"fp16": 2.0}.get(preset, 0.5 if preset.endswith("4w") else 1.0 if preset.endswith("8w") else 2.0)
        return auto_shards(stage, int(opts.shard_mb * 2**20), width)

    def shard_source(self, stage: Stage) -> tuple[Stage, dict[str, Any]]:
        """The QNN-rewritten stage (depthwise Conv3d as conv2d taps, rank-5 unpatchify, host
        timestep features): shards are cut from it, and ``t`` becomes features on the host."""
        from s2dit_deploy.stages import TensorSpec

        module, example, _, host = rewrite_for_qnn(stage.module, stage.example_inputs, stage.input_names)
        specs = tuple(TensorSpec.of(n, x) for n, x in zip(stage.input_names, example))
        return Stage(stage.name, module, tuple(example), specs, stage.outputs, stage.state_pairs), host

    def host_transform(self, spec: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
        return apply_host_inputs(spec, named) if spec else named

    def load(self, artifact: Artifact, bundle_dir: Path, *, profile: bool | None = None):
        """``profile=None``: profile if the artifact was compiled with QNN profiling."""
        from s2dit_deploy.targets.sharding import is_sharded, load_sharded

        if is_sharded(artifact):
            return load_sharded(self, artifact, bundle_dir, profile=profile)
        prof = bool(artifact.metadata.get("profile")) if profile is None else (profile and
                                                                                bool(artifact.metadata.get("profile")))
        return QnnRunner(Path(bundle_dir) / artifact.files[0], artifact.contract, profile=prof,
                         host_inputs=artifact.metadata.get("host_inputs"))


TARGET = QnnTarget()
