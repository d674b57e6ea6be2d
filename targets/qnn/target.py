"""``executorch-qnn`` target: one ExecuTorch ``.pte`` per stage, delegated to QNN HTP for one SoC.

Options (``sd.compile(..., target="executorch-qnn", soc="SM8750", precision="fp16")``):

- ``soc``: SM8650, SM8750 (Galaxy S25, default), SM8850, or any SoC ExecuTorch's QNN backend knows.
- ``precision``: ``fp16`` (default when no QuantPlan) or a PT2E preset ``8a8w``, ``16a8w``,
  ``16a4w``, ``8a4w``, ``16a16w`` (per-channel weights); a QuantPlan goes through
  ``s2dit_deploy.quant.qnn.apply_plan``.
- ``calibration``: ``{stage: [named inputs, ...]}`` or ``pipeline``: a float Pipeline whose
  streaming run is recorded (``validate.record_inputs``) to calibrate quantized stages.
- ``profile``: compile with QNN detailed profiling so the runner can report emulator cycles.
- ``act_observer``: ``minmax`` (default), ``moving_average`` (QNN's default) or ``histogram``
  (see ``lower.act_observer_class``).

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
from s2dit_deploy.stages import Stage

from .calibration import calibration_args
from .libs import ensure_qnn
from .lower import PRECISIONS, act_observer_class, htp_arch, lower, resolve_soc
from .rewrite import apply_host_inputs

log = logging.getLogger(__name__)

DEFAULT_SOC = "SM8750"
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64}


class QnnRunner:
    """Runs a QNN-delegated ``.pte`` under HTP emulation with named numpy I/O."""

    def __init__(self, path: Path, contract: dict[str, Any], profile: bool = False,
                 host_inputs: dict[str, Any] | None = None):
        self.libs = ensure_qnn()
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.inputs = contract["inputs"]
        self.output_names = [s["name"] for s in contract["outputs"]]
        self.profile = profile
        self.host_inputs = host_inputs or {}
        self._program = Runtime.get().load_program(self.path, enable_etdump=profile)
        self._method = self._program.load_method("forward")

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
        if not self.profile:
            raise RuntimeError("load the artifact with profile=True (compiled with profile=True)")
        from .profiling import read_events

        return read_events(self._program, Path(work_dir))


class QnnTarget:
    name = "executorch-qnn"

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact:
        soc = str(options.get("soc") or DEFAULT_SOC).upper()
        resolve_soc(soc)  # unknown SoC: fail before any work
        precision = str(options.get("precision") or "fp16")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} for executorch-qnn; "
                             f"choose from {', '.join(PRECISIONS)}")
        observer = str(options.get("act_observer") or "minmax")
        act_observer_class(observer)  # an unknown name fails before calibration and lowering
        profile = bool(options.get("profile", False))
        calib = None
        if plan is not None or precision != "fp16":
            calib = calibration_args(stage, options)
        t0 = time.perf_counter()
        low = lower(stage.module, stage.example_inputs, stage.input_names, soc, precision, plan, calib, profile, stage,
                    observer)
        seconds = time.perf_counter() - t0
        rel = f"{stage.name}.{soc.lower()}.pte"
        (Path(out_dir) / rel).write_bytes(low.program)
        libs = ensure_qnn()
        part = low.partition
        log.info("%s: %d/%d ops delegated to QNN (%s, %s) in %.1fs", stage.name, part["delegated_ops"],
                 part["total_ops"], soc, precision, seconds)
        return Artifact(
            stage=stage.name, target=self.name, files=[rel], contract=stage.contract(),
            quant=low.quant,
            metadata={"soc": soc, "htp_arch": htp_arch(soc), "precision": precision, "profile": profile,
                      "partition": part, "rewrites": low.rewrites,
                      "host_inputs": low.host_inputs, "qnn_libraries": libs.to_dict(),
                      "lower_seconds": round(seconds, 2),
                      "runtime": "executorch.runtime + QNN HTP (x86 emulation here, Hexagon on device)"},
        )

    def load(self, artifact: Artifact, bundle_dir: Path, profile: bool | None = None) -> QnnRunner:
        prof = bool(artifact.metadata.get("profile")) if profile is None else profile
        return QnnRunner(Path(bundle_dir) / artifact.files[0], artifact.contract, profile=prof,
                         host_inputs=artifact.metadata.get("host_inputs"))


TARGET = QnnTarget()
