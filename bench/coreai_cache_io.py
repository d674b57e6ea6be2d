"""Core AI cache window as explicit I/O vs as a state (a mutated buffer), on the Linux runtime.

The ``coreai`` target passes the DiT's cache window as inputs/outputs and the host rolls it
(``targets/coreai/convert.py``). This measures what a state would save on the runtime itself:
the same window roll (drop the oldest entries, append the new ones, read the window) as a graph
that takes and returns the window, and as one that mutates it in place (``state_names=``), both
called through ``coreai.runtime`` and timed round-robin (``harness.time_interleaved``).

    python -m s2dit_deploy.bench.coreai_cache_io --elements 262144 8388608 [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .harness import time_interleaved

NEW = 256  # entries appended per call


class WindowAsIO(torch.nn.Module):
    def forward(self, x: torch.Tensor, win: torch.Tensor):
        new = x.mean() + win[:, : x.shape[1]]
        return torch.cat([win[:, x.shape[1]:], new], 1), (win * 0.5).sum(1, keepdim=True)


class WindowAsState(torch.nn.Module):
    def __init__(self, elements: int):
        super().__init__()
        self.register_buffer("win", torch.zeros(1, elements))

    def forward(self, x: torch.Tensor):
        new = x.mean() + self.win[:, : x.shape[1]]
        out = (self.win * 0.5).sum(1, keepdim=True)
        self.win.copy_(torch.cat([self.win[:, x.shape[1]:], new], 1))
        return (out,)


def _asset(module: torch.nn.Module, args: tuple, folder: Path, name: str, **names: Any):
    import coreai_torch

    ep = torch.export.export(module, args).run_decompositions(coreai_torch.get_decomp_table())
    conv = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    return conv.add_exported_program(ep, **names).to_coreai().save_asset(folder / f"{name}.aimodel")


def measure(elements: int, repeats: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Per-call times (ms) of the two forms for a window of ``elements`` fp32 values."""
    from coreai.runtime import NDArray

    x, w = torch.randn(1, NEW), torch.randn(1, elements)
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        io = _asset(WindowAsIO(), (x, w), Path(tmp), "io", input_names=["x", "win"], output_names=["win_out", "y"])
        st = _asset(WindowAsState(elements), (x,), Path(tmp), "state", input_names=["x"], output_names=["y"],
                    state_names=["win"])
        cms = [io.executable(), st.executable()]
        fn_io, fn_st = (loop.run_until_complete(cm.__aenter__()).load_function("main") for cm in cms)
        feed = {"x": NDArray(x.numpy()), "win": NDArray(w.numpy())}
        state = {"win": NDArray(w.numpy().copy())}

        def call_io():
            feed["win"] = loop.run_until_complete(fn_io(feed))["win_out"]

        def call_state():
            loop.run_until_complete(fn_st({"x": feed["x"]}, state=state))

        times = time_interleaved({"io": call_io, "state": call_state}, repeats, warmup)
        for cm in cms:
            loop.run_until_complete(cm.__aexit__(None, None, None))
    loop.close()
    med = {k: v["median_ms"] for k, v in times.items()}
    return {"elements": elements, "io_ms": med["io"], "state_ms": med["state"],
            "state_over_io": round(med["state"] / med["io"], 3), "iqr_ms": {k: v["iqr_ms"] for k, v in times.items()},
            "label": "Core AI runtime on the Linux CPU, not device time"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, nargs="+", default=[262144, 8388608])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(sys.stderr):  # coreai-torch prints its progress on stdout
        rows = [measure(n, args.repeats) for n in args.elements]
    sys.stdout.write(json.dumps(rows, indent=1) + "\n")  # this module's CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
