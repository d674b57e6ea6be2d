#!/usr/bin/env python3
"""Standalone reference host: run a compiled s2dit-deploy bundle from its host/host_loop.json alone.

This file is copied into every bundle as ``host/reference_host.py``. It imports nothing from
s2dit-deploy: only numpy, the Hugging Face ``tokenizers`` library, the bundle's own
``host/portable_rng.py`` and the target's Python runtime (``onnxruntime``, ``executorch.runtime``,
or the Core ML reference executor loaded as a plain module from ``--coreml-executor DIR``). It is
the proof that the bundle's contract is complete, and the template to port into an app: every
step below is one entry of host_loop.json's ``loop``.

    python3 host/reference_host.py BUNDLE "a red fox in the snow" --chunks 2 --seed 0 -o frames.npy
    python3 host/reference_host.py BUNDLE "a red fox in the snow" --commit last-step -o frames.npy
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np

KNOWN_VERSION = 1
COMMIT_MODES = ("clean", "last-step")
# host_loop.json without a commit section (written before it): the commit pass, nothing else
LEGACY_COMMIT = {"default": "clean", "modes": {"clean": {"committed_call": "commit pass", "extra_call": True}}}
log = logging.getLogger("reference_host")


class HostError(RuntimeError):
    """The bundle or its host_loop.json cannot be run by this host."""


# ----------------------------------------------------------------------------- bundle data

def load_spec(bundle: Path) -> dict:
    path = bundle / "host" / "host_loop.json"
    if not path.is_file():
        raise HostError(f"{path} is missing: this bundle has no host loop spec")
    spec = json.loads(path.read_text())
    if spec.get("format") != "s2dit-host-loop":
        raise HostError(f"{path} is not an s2dit host loop spec")
    if spec.get("version") != KNOWN_VERSION:
        raise HostError(f"{path} has host loop version {spec.get('version')!r}; this reference host knows "
                        f"version {KNOWN_VERSION}")
    return spec


def commit_spec(spec: dict) -> dict:
    """host_loop.json ``commit``: the default mode and the modes the bundle describes."""
    return spec.get("commit") or LEGACY_COMMIT


def commit_mode(spec: dict, commit: str | None) -> str:
    """The commit mode to run (the spec's default when None); one the spec does not describe is refused."""
    section = commit_spec(spec)
    mode = commit or section["default"]
    if mode not in section["modes"]:
        raise HostError(f"--commit {mode}: this bundle's host_loop.json describes commit "
                        f"{', '.join(sorted(section['modes']))} only; recompile the bundle for {mode!r}")
    return mode


def inside(bundle: Path, rel: str) -> Path:
    path = (bundle / rel).resolve()
    if bundle.resolve() not in path.parents:
        raise HostError(f"{rel!r} points outside the bundle")
    return path


def load_tables(bundle: Path, spec: dict) -> dict[str, np.ndarray]:
    tables = {}
    for name, t in spec["tables"].items():
        path = inside(bundle, t["file"])
        if not path.is_file():
            raise HostError(f"table {name}: {t['file']} is missing from the bundle")
        arr = np.fromfile(path, dtype=np.dtype(t["dtype"]).newbyteorder("<"))
        if arr.size != int(np.prod(t["shape"])):
            raise HostError(f"table {name}: {t['file']} holds {arr.size} values, host_loop.json says {t['shape']}")
        tables[name] = arr.reshape(t["shape"]).astype(t["dtype"])
    return tables


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean(text: str) -> str:
    """host_loop.json tokenizer.clean: ftfy (when installed; a no-op on well-formed text), HTML
    unescape twice, whitespace runs to one space."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return " ".join(html.unescape(html.unescape(text)).split())


def tokenize(bundle: Path, spec: dict, prompt: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok_spec = spec["tokenizer"]
    tok = Tokenizer.from_file(str(inside(bundle, tok_spec["file"])))
    for check in tok_spec["checks"]:
        if tok.encode(clean(check["prompt"])).ids != check["ids"]:
            raise HostError(f"the bundle's tokenizer does not give the recorded ids for {check['prompt']!r}")
    ids = tok.encode(clean(prompt)).ids
    return np.asarray(ids, dtype=np.int64).reshape(1, tok_spec["length"])


# ----------------------------------------------------------------------------- tensors

def to_device(host: np.ndarray, tr: dict, dtype: str) -> np.ndarray:
    x = np.asarray(host)
    if x.dtype.kind == "f":
        x = x.astype(np.float32) * np.float32(tr["scale"])
    if tr["perm"]:
        x = np.transpose(x, tr["perm"])
    return np.ascontiguousarray(x.reshape(tr["device_shape"])).astype(dtype)


def to_host(dev: np.ndarray, tr: dict) -> np.ndarray:
    x = np.asarray(dev)
    if tr["perm"]:
        x = np.transpose(x.reshape([tr["host_shape"][p] for p in tr["perm"]]), np.argsort(tr["perm"]))
    x = x.reshape(tr["host_shape"])
    return x.astype(np.float32) / np.float32(tr["scale"]) if x.dtype.kind == "f" else x


def roll(rule: dict, old: np.ndarray, new: np.ndarray | None) -> np.ndarray:
    """host_loop.json state rules on device arrays."""
    if rule["rule"] == "replace":
        return np.asarray(new).reshape(old.shape).astype(old.dtype)
    axis, n = rule["axis"], rule["length"]
    slot_shape = list(old.shape)
    slot_shape[axis] = n
    slot = (np.full(slot_shape, rule["fill"], dtype=old.dtype) if rule["rule"] == "fill_roll"
            else np.asarray(new).reshape(slot_shape).astype(old.dtype))
    return np.concatenate([np.take(old, np.arange(n, old.shape[axis]), axis=axis), slot], axis=axis)


def rope(tables: dict, grid: str, offset: int) -> dict[str, np.ndarray]:
    pos, freq, is_time = (tables[f"rope.{grid}.{k}"] for k in ("pos", "freq", "is_time"))
    a = (pos + np.float32(offset) * is_time) * freq
    a = np.concatenate([a, a], axis=-1)
    return {"cos": np.cos(a).astype(np.float32), "sin": np.sin(a).astype(np.float32)}


# ----------------------------------------------------------------------------- runtimes

class Program:
    """One stage program: device-named arrays in, device-named arrays out."""

    def __init__(self, bundle: Path, stage: dict, coreml_executor: Path | None):
        if stage["chained_programs"] != 1:
            raise HostError(f"{stage['files'][0]}: a stage split into {stage['chained_programs']} chained "
                            "programs is not run by reference host v1")
        self.inputs, self.outputs, kind = stage["inputs"], stage["outputs"], stage["runtime"]
        files = [inside(bundle, f) for f in stage["files"]]
        self.run = {"onnxruntime": self._onnx, "executorch": self._executorch,
                    "coreml": self._coreml, "coreai": self._coreai}.get(kind)
        if self.run is None:
            raise HostError(f"runtime {kind!r} needs the device runtime (QNN HTP); the reference host runs "
                            "onnxruntime, executorch (XNNPACK), coreml and coreai bundles")
        getattr(self, f"_open_{kind}")(files, coreml_executor)

    def _open_onnxruntime(self, files, _):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(files[0]), so, providers=["CPUExecutionProvider"])

    def _onnx(self, feed: dict) -> dict:
        names = [i.name for i in self.session.get_inputs()]  # an exporter may drop unused inputs
        outs = self.session.run(None, {n: feed[n] for n in names})
        return dict(zip([o.name for o in self.session.get_outputs()], outs))

    def _open_executorch(self, files, _):
        from executorch.runtime import Runtime

        import executorch.kernels.quantized  # noqa: F401  (q/dq kernels outside the delegate)

        data = [f for f in files if f.suffix == ".ptd"]
        pte = next(f for f in files if f.suffix == ".pte")
        self.method = Runtime.get().load_program(pte, data_path=data[0] if data else None).load_method("forward")

    def _executorch(self, feed: dict) -> dict:
        import torch

        outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(feed[i["device_name"]]))
                                    for i in self.inputs])
        return {o["device_name"]: v.numpy() for o, v in zip(self.outputs, outs)}

    def _open_coreml(self, files, executor_dir):
        if executor_dir is None:
            raise HostError("a coreml bundle needs --coreml-executor DIR (the folder holding executor.py) "
                            "or Apple's Core ML runtime on device")
        pkg = types.ModuleType("coreml_reference_executor")
        pkg.__path__ = [str(executor_dir)]
        sys.modules[pkg.__name__] = pkg
        executor = importlib.import_module(f"{pkg.__name__}.executor")
        self.program = executor.load_program(str(files[0]))

    def _coreml(self, feed: dict) -> dict:
        return dict(self.program.run(feed))

    def _open_coreai(self, files, _):
        import asyncio

        from coreai.authoring import AIModelAsset

        # the runtime is async; one loop per program keeps its executable() context open
        self.loop = asyncio.new_event_loop()
        self._cm = AIModelAsset.load(files[0]).executable()
        self.fn = self.loop.run_until_complete(self._cm.__aenter__()).load_function("main")

    def _coreai(self, feed: dict) -> dict:
        from coreai.runtime import NDArray

        out = self.loop.run_until_complete(self.fn({i["device_name"]: NDArray(np.ascontiguousarray(
            feed[i["device_name"]])) for i in self.inputs}))
        return {k: v.numpy() for k, v in out.items()}


# ----------------------------------------------------------------------------- the loop

class Host:
    def __init__(self, bundle: Path, coreml_executor: Path | None = None):
        self.bundle = bundle
        self.spec = load_spec(bundle)
        self.tables = load_tables(bundle, self.spec)
        self.rng = load_module(inside(bundle, self.spec["rng"]["file"]), "portable_rng")
        if self.rng.ALGORITHM != self.spec["rng"]["algorithm"]:
            raise HostError(f"{self.spec['rng']['file']} implements {self.rng.ALGORITHM}, the spec says "
                            f"{self.spec['rng']['algorithm']}")
        self.programs = {n: Program(bundle, s, coreml_executor) for n, s in self.spec["stages"].items()}
        self._rope_key, self._rope = None, {}

    def rope(self, grid: str, offset: int) -> dict[str, np.ndarray]:
        """cos and sin of a grid at a frame offset, computed once per chunk (every call of a chunk
        shares its offset)."""
        if self._rope_key != (grid, offset):
            self._rope_key, self._rope = (grid, offset), rope(self.tables, grid, offset)
        return self._rope

    def call(self, name: str, ctx: dict) -> dict:
        """Feed one stage from its inputs' sources; host-form outputs (and keeps device ones)."""
        stage = self.spec["stages"][name]
        feed = {}
        for inp in stage["inputs"]:
            src, dtype = inp["source"], inp["device_dtype"]
            kind = src["from"]
            if kind == "state":
                feed[inp["device_name"]] = ctx["state"][name][inp["name"]]
                continue
            if kind == "table":
                row = self.tables[src["table"]][ctx["t_row"]]
                feed[inp["device_name"]] = row.reshape(inp["device_shape"]).astype(dtype)
                continue
            host = {"tokenizer": lambda: ctx["input_ids"],
                    "latent": lambda: ctx["latent"],
                    "output": lambda: ctx["outputs"][src["stage"]][src["output"]],
                    "rope": lambda: self.rope(src["grid"], ctx["frame_offset"])[src["part"]]}[kind]()
            feed[inp["device_name"]] = to_device(host, inp["transform"], dtype)
        dev = self.programs[name].run(feed)
        ctx["device_outputs"][name] = {o["name"]: dev[o["device_name"]] for o in stage["outputs"]}
        host_out = {o["name"]: to_host(dev[o["device_name"]], o["transform"]) for o in stage["outputs"]}
        ctx["outputs"][name] = host_out
        return host_out

    def roll_state(self, name: str, ctx: dict) -> None:
        for rule in self.spec["state"][name]:
            new = ctx["device_outputs"][name][rule["output"]] if rule["output"] else None
            ctx["state"][name][rule["input"]] = roll(rule, ctx["state"][name][rule["input"]], new)

    def denoise(self, ctx: dict, rows: list[int], chunk: int, seed: int) -> None:
        sched = self.spec["schedule"]
        values, shape = sched["values"], self.spec["model"]["latent_shape"]
        for i, row in enumerate(rows):
            # scalars are formed in float64 and rounded once to float32, as torch does with Python floats
            t, t_next = values[row], (values[rows[i + 1]] if i + 1 < len(rows) else 0.0)
            ctx["t_row"] = row
            v = self.call("dit_step", ctx)["velocity"]
            if sched["rule"] == "euler":
                ctx["latent"] = ctx["latent"] + np.float32(t_next - t) * v
                continue
            x0 = ctx["latent"] - np.float32(t) * v
            if i + 1 == len(rows):
                ctx["latent"] = x0
            else:
                eps = self.rng.normal(seed, chunk, i + 1, tuple(shape))
                ctx["latent"] = np.float32(1.0 - t_next) * x0 + np.float32(t_next) * eps

    def stream(self, prompt: str, chunks: int, seed: int, steps: int | None = None, commit: str | None = None):
        """Frames per chunk; ``commit`` (host_loop.json ``commit``) picks the call whose entries are rolled."""
        mode = commit_mode(self.spec, commit)
        sched = self.spec["schedule"]
        steps = str(steps or sched["default_steps"])
        if steps not in sched["rows"]:
            raise HostError(f"this bundle's schedule has rows for {sorted(sched['rows'])} steps, not {steps}")
        ctx = {"outputs": {}, "device_outputs": {}, "state": {}, "frame_offset": 0}
        frames_spec = self.spec["frames"]
        for op in self.spec["loop"]["per_prompt"]:
            if op["op"] == "tokenize":
                ctx["input_ids"] = tokenize(self.bundle, self.spec, prompt)
            elif op["op"] == "call":
                self.call(op["stage"], ctx)
            elif op["op"] == "init_state":
                ctx["state"] = {n: {i["name"]: np.zeros(i["device_shape"], dtype=i["device_dtype"])
                                    for i in s["inputs"] if i["source"]["from"] == "state"}
                                for n, s in self.spec["stages"].items()}
            else:
                raise HostError(f"unknown per-prompt op {op['op']!r}")
        for chunk in range(chunks):
            for op in self.spec["loop"]["per_chunk"]:
                kind = op["op"]
                if mode not in op.get("commit_modes", (mode,)):
                    continue  # e.g. the t = 0 commit pass with commit last-step
                if kind == "noise":
                    ctx["latent"] = self.rng.normal(seed, chunk, op["draw"], tuple(self.spec["model"]["latent_shape"]))
                elif kind == "denoise":
                    self.denoise(ctx, sched["rows"][steps], chunk, seed)
                elif kind == "call":
                    if op.get("t_row") == "commit":
                        ctx["t_row"] = sched["commit_row"]
                    self.call(op["stage"], ctx)
                elif kind == "roll_state":
                    self.roll_state(op["stage"], ctx)
                elif kind == "emit_frames":
                    video = ctx["outputs"][frames_spec["stage"]][frames_spec["output"]]
                    v = np.round((np.clip(video[0], -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)
                    yield np.ascontiguousarray(np.transpose(v, (1, 2, 3, 0)))
                elif kind == "advance":
                    ctx["frame_offset"] += op["frame_offset"]
                else:
                    raise HostError(f"unknown per-chunk op {kind!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, help="the bundle folder")
    p.add_argument("prompt")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="1, 2 or 4 (default: the spec's default_steps)")
    p.add_argument("--commit", choices=COMMIT_MODES, default=None,
                   help="clean: roll in the entries of a t = 0 pass on the clean chunk (steps + 1 dit_step calls "
                        "per chunk); last-step: those of the last denoising call (steps calls). Default: the "
                        "spec's commit.default")
    p.add_argument("--coreml-executor", type=Path, default=None, help="folder of the Core ML reference executor")
    p.add_argument("-o", "--out", type=Path, default=Path("frames.npy"), help="uint8 frames (T, H, W, 3) .npy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the script's entry point, not a library
    try:
        host = Host(args.bundle, args.coreml_executor)
        frames = np.concatenate(list(host.stream(args.prompt, args.chunks, args.seed, args.steps, args.commit)), axis=0)
    except HostError as exc:
        log.error("error: %s", exc)
        return 2
    np.save(args.out, frames)
    log.info("wrote %s: %d frames %dx%d", args.out, frames.shape[0], frames.shape[1], frames.shape[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
