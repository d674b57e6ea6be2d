"""A Runner for programs compiled from a rewritten ``DeviceStage`` (Core ML, Core AI).

The program takes device tensors (channels-first layout, fp16-safe cache scales, device names);
callers feed and read the float contract's host tensors. The ``IOMap``s recorded in the artifact
translate both ways, so the host pipeline never learns a device layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from s2dit_deploy.rewrites.device_io import IOMap
from s2dit_deploy.targets.base import Runner


class DeviceIORunner(Runner):
    """Host-contract tensors in and out; device layout and scales handled here (fp32 on the host)."""

    def __init__(self, program: Any, inputs: list[IOMap], outputs: list[IOMap], io_dtype: str = "fp16"):
        self.program, self.inputs, self.outputs = program, inputs, outputs
        self.io_dtype = np.float16 if io_dtype == "fp16" else np.float32

    def to_device(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [m.name for m in self.inputs if m.name not in inputs]
        if missing:
            raise KeyError(f"missing inputs {missing}; the stage takes {[m.name for m in self.inputs]}")
        out = {}
        for m in self.inputs:
            arr = m.to_device(np.asarray(inputs[m.name]))
            out[m.device_name] = arr.astype(self.io_dtype) if arr.dtype.kind == "f" else arr.astype(np.int32)
        return out

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dev = self.program.run(self.to_device(inputs))
        return {m.name: m.to_host(np.asarray(dev[m.device_name]).astype(np.float32)) for m in self.outputs}
