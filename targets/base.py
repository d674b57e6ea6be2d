"""The one small interface every target implements, and the registry that finds them.

A target compiles a ``Stage`` into files inside a bundle folder and returns an ``Artifact``; it
can also open an artifact for execution on this machine (host runtime or reference executor).
Targets are imported lazily so a missing optional toolchain only matters when it is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from s2dit_deploy.bundle import Artifact
from s2dit_deploy.stages import Stage

# name -> (module, pip extra that provides its toolchain)
TARGETS: dict[str, tuple[str, str]] = {
    "coreml": ("s2dit_deploy.targets.coreml.target", "coreml"),
    "executorch-xnnpack": ("s2dit_deploy.targets.xnnpack.target", "executorch"),
    "executorch-qnn": ("s2dit_deploy.targets.qnn.target", "executorch,qnn"),
    "onnx": ("s2dit_deploy.targets.onnx.target", "onnx"),
    "onnx-qnn": ("s2dit_deploy.targets.onnx.qnn_target", "onnx,qnn"),
}


class TargetUnavailable(RuntimeError):
    """The target exists but its toolchain (or a runtime for this machine) is not installed."""


class Runner(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Target(Protocol):
    name: str

    def compile(self, stage: Stage, plan: Any, out_dir: Path, options: dict[str, Any]) -> Artifact: ...

    def load(self, artifact: Artifact, bundle_dir: Path) -> Runner: ...


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    module, extra = TARGETS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("s2dit_deploy"):
            raise TargetUnavailable(f"target {name!r} is not implemented in this version") from exc
        raise TargetUnavailable(
            f"target {name!r} needs {exc.name!r}: pip install 's2dit-deploy[{extra}]'"
        ) from exc
    return mod.TARGET
