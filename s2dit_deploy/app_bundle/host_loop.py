"""``host/host_loop.json``: the streaming loop an app runs, as versioned data (schema beside this file).

It is generated from the code that drives ``host.py``: the stage contracts and device I/O maps the
targets wrote, ``FewStepSchedule`` (timesteps), ``model_zoo.portable_rng`` (noise) and
``model_zoo.cache.push_entries`` (cache roll). The roll is restated on the *device* arrays, so an
app keeps every cache in the form the program returns it (layout, fp16 scale) and only
concatenates; each restated rule is checked against ``push_entries`` on random data before it is
written, so the spec cannot silently disagree with the project's host.

Every stage input has a ``source`` (the tokenizer, another stage's output, the sampler's latent, a
table row, the RoPE tables or carried state) and a ``transform`` from the host layout to the
device tensor: ``device = reshape(transpose(host * scale, perm), device_shape)``. Outputs carry the
inverse. ``loop`` lists the operations per prompt and per chunk in order; the reference host
interprets exactly that list.

``commit`` says which dit_step call's entry outputs are rolled into the caches after a chunk
(``Pipeline``'s ``commit`` option) and what a chunk costs: ``clean`` runs the t = 0 commit pass
(the ``call`` op marked ``commit_modes: ["clean"]``), ``last-step`` skips that op and rolls the
last denoising call's outputs. The section is additive: a version-1 host that predates it runs
every op, which is ``clean``, and a spec without it (an older bundle) describes ``clean`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from ..bundle import Artifact, BundleError, resolve_inside
from ..model_zoo import portable_rng
from ..model_zoo.cache import VALID_KEY, push_entries
from ..model_zoo.config import ModelConfig
from ..model_zoo.pipeline import COMMIT_MODES, dit_calls_per_chunk
from ..model_zoo.sampler import FewStepSchedule
from ..rewrites.device_io import IOMap, maps_from_json
from .reference_host import roll as apply_rule  # the very lines apps get: the check tests them

HOST_LOOP_FORMAT = "s2dit-host-loop"
HOST_LOOP_VERSION = 1
HOST_LOOP_FILE = "host/host_loop.json"
SCHEMA_PATH = Path(__file__).with_name("host_loop.schema.json")
ROPE_INPUTS = {"hi_cos": ("hi", "cos"), "hi_sin": ("hi", "sin"), "lo_cos": ("lo", "cos"), "lo_sin": ("lo", "sin")}
RUNTIMES = {
    "coreml": "coreml", "onnx": "onnxruntime", "onnx-qnn": "onnxruntime-qnn",
    "executorch-xnnpack": "executorch", "executorch-qnn": "executorch-qnn", "coreai": "coreai",
}


class HostLoopError(BundleError):
    """host_loop.json is missing, of an unknown version, or malformed."""


def device_maps(artifact: Artifact) -> tuple[list[IOMap], list[IOMap], str]:
    """(input maps, output maps, device float dtype): Core ML's stored maps, identity elsewhere."""
    io = artifact.metadata.get("device_io")
    if io:
        fp = "float16" if artifact.metadata.get("options", {}).get("io_dtype", "fp16") == "fp16" else "float32"
        return maps_from_json(io["inputs"]), maps_from_json(io["outputs"]), fp
    ident = lambda s: IOMap(s["name"], s["name"], tuple(s["shape"]), tuple(s["shape"]))  # noqa: E731
    return ([ident(s) for s in artifact.contract["inputs"]], [ident(s) for s in artifact.contract["outputs"]],
            "float32")


def _device_dtype(contract_dtype: str, float_dtype: str, is_table_float: bool = False) -> str:
    if contract_dtype.startswith("float") or is_table_float:
        return float_dtype
    return "int32" if contract_dtype.startswith("int") else contract_dtype


def _transform(m: IOMap) -> dict[str, Any]:
    return {"host_shape": list(m.host_shape), "scale": m.scale, "perm": list(m.perm) if m.perm else None,
            "device_shape": list(m.device_shape)}


def _source(stage: str, name: str) -> dict[str, Any]:
    if stage == "text_encoder" and name == "input_ids":
        return {"from": "tokenizer"}
    if stage == "dit_step":
        if name == "x":
            return {"from": "latent"}
        if name == "t":
            return {"from": "table", "table": "t.dit_step", "row": "timestep row of the call"}
        if name == "context":
            return {"from": "output", "stage": "text_encoder", "output": "context"}
        if name in ROPE_INPUTS:
            grid, part = ROPE_INPUTS[name]
            return {"from": "rope", "grid": grid, "part": part}
    if stage == "decoder" and name == "z":
        return {"from": "latent"}
    if name.startswith("cache."):
        return {"from": "state"}
    raise BundleError(f"stage {stage} input {name!r} has no host source; the host loop spec v{HOST_LOOP_VERSION} "
                      "does not know it")


def _roll_axis(m: IOMap, host_axis: int) -> int:
    """The device axis a host axis lands on (after perm and a reshape that keeps it whole)."""
    permuted = [m.host_shape[p] for p in m.perm] if m.perm else list(m.host_shape)
    pos = m.perm.index(host_axis) if m.perm else host_axis
    before = int(np.prod(permuted[:pos], dtype=np.int64))
    for k in range(len(m.device_shape)):
        if int(np.prod(m.device_shape[:k], dtype=np.int64)) == before and m.device_shape[k] == permuted[pos]:
            return k
    raise BundleError(f"cache {m.name}: host axis {host_axis} is split by the device layout {m.device_shape}")


def state_rules(stage: str, ins: list[IOMap], outs: list[IOMap], pairs: list[list[str]]) -> list[dict[str, Any]]:
    """How each carried input becomes its next value, on device arrays."""
    by_out = {m.name: m for m in outs}
    rules = []
    for m in ins:
        if not m.name.startswith("cache."):
            continue
        out_name = next((o for i, o in pairs if i == m.name), None)
        kind = m.name.rsplit(".", 1)[-1]
        if stage == "decoder" or kind == "vtail":
            rules.append({"input": m.name, "output": out_name, "rule": "replace", "when": "every call" if
                          stage == "decoder" else "commit pass"})
        elif m.name == f"cache.{VALID_KEY}":
            rules.append({"input": m.name, "output": None, "rule": "fill_roll", "axis": _roll_axis(m, 0),
                          "length": 1, "fill": 1.0, "when": "commit pass"})
        elif kind in ("kv", "ksum", "k", "v"):
            host_axis = 0 if kind in ("kv", "ksum") else 2
            length = 1 if host_axis == 0 else by_out[out_name].host_shape[2]
            rules.append({"input": m.name, "output": out_name, "rule": "window_roll",
                          "axis": _roll_axis(m, host_axis), "length": int(length), "when": "commit pass"})
        else:
            raise BundleError(f"stage {stage}: cache {m.name!r} has no roll rule in host loop v{HOST_LOOP_VERSION}")
        if out_name is not None and m.scale != by_out[out_name].scale:
            raise BundleError(f"{m.name} and {out_name} use device scales {m.scale} and {by_out[out_name].scale}; "
                              "a device-form roll needs one")
    return rules


def check_rules(rules: list[dict[str, Any]], ins: list[IOMap], outs: list[IOMap]) -> None:
    """The device-form rolls equal ``push_entries`` on random host tensors (dit_step caches)."""
    rng = np.random.default_rng(0)
    by_name = {m.name: m for m in [*ins, *outs]}
    cache = {m.name[len("cache."):]: rng.standard_normal(m.host_shape).astype(np.float32)
             for m in ins if m.name.startswith("cache.")}
    entries = {m.name[len("entry."):]: rng.standard_normal(m.host_shape).astype(np.float32)
               for m in outs if m.name.startswith("entry.")}
    want = {k: v.numpy() for k, v in push_entries(
        {k: _t(v) for k, v in cache.items()}, {k: _t(v) for k, v in entries.items()}).items()}
    for r in rules:
        m = by_name[r["input"]]
        old = m.to_device(cache[m.name[len("cache."):]])
        new = by_name[r["output"]].to_device(entries[r["output"][len("entry."):]]) if r["output"] else None
        try:
            got = m.to_host(apply_rule(r, old, new))
        except (ValueError, IndexError) as exc:
            raise BundleError(f"host loop rule {r} for {m.name} disagrees with model_zoo.cache.push_entries: "
                              f"{exc}") from exc
        if not np.allclose(got, want[m.name[len("cache."):]], rtol=1e-5, atol=1e-6):
            raise BundleError(f"host loop rule {r} for {m.name} disagrees with model_zoo.cache.push_entries")


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(a)


def stage_spec(stage: str, artifact: Artifact, target: str) -> tuple[dict[str, Any], list[IOMap], list[IOMap]]:
    ins, outs, fp = device_maps(artifact)
    specs = {s["name"]: s for s in artifact.contract["inputs"]}
    out_specs = {s["name"]: s for s in artifact.contract["outputs"]}
    inputs = []
    for m in ins:
        entry = {"name": m.name, "device_name": m.device_name, "device_shape": list(m.device_shape),
                 "device_dtype": _device_dtype(specs[m.name]["dtype"], fp, m.onehot is not None or
                                               m.sinusoidal is not None),
                 "source": _source(stage, m.name)}
        if entry["source"]["from"] not in ("table",):
            entry["transform"] = _transform(m)
        inputs.append(entry)
    outputs = [{"name": m.name, "device_name": m.device_name, "device_shape": list(m.device_shape),
                "device_dtype": _device_dtype(out_specs[m.name]["dtype"], fp), "transform": _transform(m)}
               for m in outs]
    chained = artifact.metadata.get("chunks") or artifact.metadata.get("shards")
    spec = {"files": list(artifact.files), "runtime": RUNTIMES.get(target, target),
            "chained_programs": len(artifact.files) if chained else 1,
            "inputs": inputs, "outputs": outputs}
    return spec, ins, outs


def loop_ops(config: ModelConfig) -> dict[str, list[dict[str, Any]]]:
    """The per-prompt and per-chunk operations, in order (what ``Pipeline.stream`` does)."""
    f = config.stream.chunk_frames
    return {
        "per_prompt": [
            {"op": "tokenize", "doc": "clean(prompt), Tokenizer.encode -> input_ids (1, L) int32"},
            {"op": "call", "stage": "text_encoder", "doc": "context, reused by every dit_step call"},
            {"op": "init_state", "doc": "every state input: zeros of its device shape and dtype; frame_offset = 0"},
        ],
        "per_chunk": [
            {"op": "noise", "draw": 0, "doc": "latent = rng.normal(seed, chunk, 0, latent_shape)"},
            {"op": "denoise", "doc": "for each timestep row r_i of the schedule: v = dit_step(latent, t row r_i); "
                                     "x0 = latent - t_i * v; latent = x0 after the last step, else (renoise) "
                                     "(1 - t_{i+1}) * x0 + t_{i+1} * rng.normal(seed, chunk, i + 1, latent_shape) "
                                     "or (euler) latent + (t_{i+1} - t_i) * v. Entries of these calls are dropped, "
                                     "except the last call's with commit last-step (keep its outputs)"},
            {"op": "call", "stage": "dit_step", "t_row": "commit", "commit_modes": ["clean"],
             "doc": "the commit pass (commit clean only; skipped with last-step): dit_step on the clean latent "
                    "at t = 0"},
            {"op": "roll_state", "stage": "dit_step", "doc": "apply state.dit_step with the committed call's "
                                                             "outputs: the commit pass (clean) or the last "
                                                             "denoising call (last-step); see commit"},
            {"op": "call", "stage": "decoder", "doc": "z = the clean latent"},
            {"op": "roll_state", "stage": "decoder", "doc": "decoder caches <- cache_out"},
            {"op": "emit_frames", "doc": "frames of the decoder's video output (see frames)"},
            {"op": "advance", "frame_offset": f, "doc": f"frame_offset += {f} (latent frames per chunk; RoPE time "
                                                         "positions count latent frames)"},
        ],
    }


def commit_section(rows: dict[str, list[int]]) -> dict[str, Any]:
    """Which call's entries each commit mode rolls in, and the dit_step calls per chunk per step count."""
    calls = lambda mode: {k: dit_calls_per_chunk(len(v), mode) for k, v in rows.items()}  # noqa: E731
    docs = {
        "clean": ("commit pass", True, "after the last denoising step, one more dit_step call on the clean latent "
                                       "(x0) at schedule.commit_row (t = 0); its entry outputs are rolled in"),
        "last-step": ("last denoising step", False, "no extra call: the entry outputs of the last denoising "
                                                    "dit_step call (its input is the latent at the last timestep, "
                                                    "not the clean one) are rolled in"),
    }
    return {"default": COMMIT_MODES[0],
            "modes": {m: {"committed_call": docs[m][0], "extra_call": docs[m][1], "doc": docs[m][2],
                          "dit_step_calls_per_chunk": calls(m)} for m in COMMIT_MODES}}


def build_host_loop(config: ModelConfig, target: str, artifacts: dict[str, Artifact],
                    tables: dict[str, dict[str, Any]], schedule: dict[str, Any],
                    tokenizer: dict[str, Any]) -> dict[str, Any]:
    stages, state = {}, {}
    for name in ("text_encoder", "dit_step", "decoder"):
        spec, ins, outs = stage_spec(name, artifacts[name], target)
        stages[name] = spec
        rules = state_rules(name, ins, outs, artifacts[name].contract.get("state_pairs", []))
        if name == "dit_step":
            check_rules(rules, ins, outs)
        state[name] = rules
    d, f = config.dit, config.stream.chunk_frames
    video = next(o for o in artifacts["decoder"].contract["outputs"] if o["name"] == "video")
    return {
        "format": HOST_LOOP_FORMAT, "version": HOST_LOOP_VERSION,
        "model": {"name": config.name, "height": config.height, "width": config.width, "fps": config.fps,
                  "chunk_latent_frames": f, "latent_shape": [1, *config.chunk_latent_shape]},
        "target": target,
        "tokenizer": tokenizer,
        "rng": {"algorithm": portable_rng.ALGORITHM, "file": "host/portable_rng.py",
                "stream": f"chunk * {portable_rng.DRAWS_PER_CHUNK} + draw",
                "draws": "draw 0: the chunk's initial noise; draw j >= 1: the re-noise before denoising step j"},
        "schedule": schedule,
        "commit": commit_section(schedule["rows"]),
        "tables": tables,
        "rope": {"theta": d.rope_theta, "head_dim": d.head_dim,
                 "formula": "a = (pos + frame_offset * is_time) * freq (fp32, (N, head_dim/2)); "
                            "cos = cos([a, a]), sin = sin([a, a]) concatenated on the last axis -> (N, head_dim)"},
        "stages": stages,
        "state": state,
        "loop": loop_ops(config),
        "frames": {"stage": "decoder", "output": "video", "host_layout": "(1, 3, T, H, W) in [-1, 1]",
                   "to_uint8": "round_half_even((clip(v, -1, 1) + 1) * 127.5) as uint8",
                   "frame_layout": "(T, H, W, 3)", "frames_per_chunk": int(video["shape"][2])},
    }


def schedule_spec(config: ModelConfig, values: list[float], rows: dict[str, list[int]], commit: int,
                  unusable_rows: list[int]) -> dict[str, Any]:
    """The schedule section; a step count needing a row the device cannot take (a folded one-hot
    without that t) is left out."""
    usable = {k: v for k, v in rows.items() if not set(v) & set(unusable_rows)}
    default = FewStepSchedule(steps=config.steps)
    return {"default_steps": config.steps, "rule": default.rule, "shift": default.shift,
            "values": values, "rows": usable, "commit_row": commit}


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_host_loop(data: Any, where: str) -> dict[str, Any]:
    """Version first (with both versions in the message), then the schema."""
    if not isinstance(data, dict) or data.get("format") != HOST_LOOP_FORMAT:
        raise HostLoopError(f"{where} is not a {HOST_LOOP_FORMAT} file")
    if data.get("version") != HOST_LOOP_VERSION:
        raise HostLoopError(f"{where} has host loop version {data.get('version')!r}; this host knows version "
                            f"{HOST_LOOP_VERSION}: recompile the bundle or use a matching host")
    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(data), key=lambda e: len(e.absolute_path))
    if errors:
        e = errors[0]
        raise HostLoopError(f"{where} is malformed at {e.json_path}: {e.message}")
    commit = data.get("commit")
    if commit is not None and commit["default"] not in commit["modes"]:
        raise HostLoopError(f"{where}: commit.default {commit['default']!r} is not one of commit.modes "
                            f"{sorted(commit['modes'])}")
    return data


def load_host_loop(bundle_dir: str | Path) -> dict[str, Any]:
    """The checked spec of a bundle; each table file named in it must exist inside the bundle."""
    path = resolve_inside(bundle_dir, HOST_LOOP_FILE, "host loop")
    if not path.is_file():
        raise HostLoopError(f"{path} is missing: the bundle was compiled without its host assets "
                            "(an older version or a partial stage list); recompile all three stages")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise HostLoopError(f"{path} is corrupt: {exc}") from exc
    validate_host_loop(data, str(path))
    for name, table in data["tables"].items():
        if not resolve_inside(bundle_dir, table["file"], f"tables.{name}").is_file():
            raise HostLoopError(f"table {name}: {table['file']} named in {path} is missing from the bundle")
    return data
