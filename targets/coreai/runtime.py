"""Run a ``.aimodel`` on this machine with Apple's Core AI runtime (coreai-core), synchronously.

coreai's API is async (``async with asset.executable() as model``, ``await fn(inputs)``); the host
pipeline calls runners synchronously, so each loaded program owns one event loop and keeps the
``executable()`` context open until it is closed. On Linux, entering it lowers the program to an
ODIX binary in a temporary folder (``main-universal.odix``): that is the load cost, paid once per
runner. The runtime has no specialization options on Linux (CPU only), so it computes in the
program's own dtype: an fp16 program computes in fp16.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from s2dit_deploy.errors import InputError

log = logging.getLogger(__name__)

LABEL = "Core AI runtime on the Linux CPU, not device time"
_NP = {"float16": np.float16, "float32": np.float32, "int32": np.int32}  # descriptor dtype names


class CoreAILoadError(InputError):
    """A ``.aimodel`` named by the artifact is missing or the runtime could not load it."""


class CoreAIProgram:
    """One loaded ``.aimodel`` function: device-named numpy in, device-named numpy out."""

    def __init__(self, path: str | Path, function: str = "main"):
        from coreai.authoring import AIModelAsset

        self.path = Path(path)
        if not self.path.is_dir() or not AIModelAsset.is_valid(self.path):
            raise CoreAILoadError(f"{self.path} is not a Core AI model (.aimodel folder with main.mlirb); "
                                  "copy the whole bundle folder or recompile it")
        self._loop = asyncio.new_event_loop()
        t0 = time.perf_counter()
        try:
            self._cm = AIModelAsset.load(self.path).executable()
            model = self._loop.run_until_complete(self._cm.__aenter__())
            self._fn = model.load_function(function)
        except Exception as exc:
            self._loop.close()
            raise CoreAILoadError(f"the Core AI runtime could not load {self.path.name}: {exc}") from exc
        self.load_seconds = time.perf_counter() - t0
        desc = self._fn.desc
        self.input_names = list(desc.input_names)
        self.output_names = list(desc.output_names)
        self._dtypes = {n: _NP.get(str(desc.input_descriptor(n).dtype).lower(), None) for n in self.input_names}
        log.debug("coreai: loaded %s in %.1f s", self.path.name, self.load_seconds)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coreai.runtime import NDArray

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {missing}")
        feed = {}
        for n in self.input_names:
            arr = np.asarray(inputs[n])
            dt = self._dtypes.get(n)
            feed[n] = NDArray(np.ascontiguousarray(arr if dt is None else arr.astype(dt, copy=False)))
        out = self._loop.run_until_complete(self._fn(feed))
        return {k: v.numpy() for k, v in out.items()}

    def close(self) -> None:
        if getattr(self, "_loop", None) is None or self._loop.is_closed():
            return
        try:
            self._loop.run_until_complete(self._cm.__aexit__(None, None, None))
        finally:
            self._loop.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_program(path: str | Path) -> CoreAIProgram:
    return CoreAIProgram(path)


def descriptor(path: str | Path) -> dict[str, Any]:
    """Input / output names and dtypes of a loaded program (for reports and tests)."""
    prog = CoreAIProgram(path)
    try:
        d = prog._fn.desc
        return {"inputs": {n: str(d.input_descriptor(n).dtype) for n in prog.input_names},
                "outputs": {n: str(d.output_descriptor(n).dtype) for n in prog.output_names},
                "load_seconds": round(prog.load_seconds, 2)}
    finally:
        prog.close()
