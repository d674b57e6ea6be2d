"""Sharded stages: one ``dit_step`` compiled as N chained programs by any target.

An HTP context holds about 4 GB and its graph must fit the TCM at every op, and a QNN ``.pte``
embeds its context binary in a 2 GB flatbuffer; ExecuTorch's Qualcomm LLM scripts therefore cut
the model into ``num_sharding`` graphs. Here the cut is ``rewrites.graph_split`` (along the DiT's
groups, balanced by weight bytes) and each shard is an ordinary ``Stage`` that the target compiles
with its own ``compile`` into ``<stage>.shardK/``. The combined ``Artifact`` lists every shard's
files (so the bundle hashes them) and keeps each shard's own artifact in its metadata;
``ShardedRunner`` chains the shards' runners, passing the boundary tensors (``carry.*``) along.

Shards are promoted to fp32 one at a time (an fp16 checkpoint never exists twice in fp32), and a
quantized shard calibrates on the real recorded inputs of the whole stage pushed through the float
shards before it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2dit_deploy.errors import InputError

from s2dit_deploy.bundle import Artifact, resolve_inside
from s2dit_deploy.rewrites.graph_split import (Piece, describe, pieces_for_bound, promote_piece, run_chain,
                                                split_graph, torch_piece_run)
from s2dit_deploy.stages import Stage, TensorSpec

log = logging.getLogger(__name__)

SHARD_KEY = "shards"


def _piece_stage(stage: Stage, piece: Piece, examples: tuple[torch.Tensor, ...]) -> tuple[Stage, tuple]:
    """A shard as a Stage (same stage name, so quantization plans find their layers)."""
    with torch.no_grad():
        outs = piece.module(*examples)
    ins = tuple(TensorSpec.of(n, x) for n, x in zip(piece.input_names, examples))
    out_specs = tuple(TensorSpec.of(n, o) for n, o in zip(piece.output_names, outs))
    return Stage(stage.name, piece.module, tuple(examples), ins, out_specs), outs


def _calibration_for(piece: Piece, samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{n: s[n] for n in piece.input_names} for s in samples]


def compile_sharded(tgt: Any, stage: Stage, plan: Any, bundle_dir: Path, options: dict[str, Any],
                    shards: int) -> Artifact:
    """Compile ``stage`` as ``shards`` chained programs with ``tgt.compile``; one combined Artifact."""
    calib = _stage_calibration(stage, plan, options)
    stage, host = tgt.shard_source(stage)  # the target's own rewrites come before the cut
    if calib is not None and host:
        calib = [tgt.host_transform(host, dict(s)) for s in calib]
    pieces = split_graph(stage.module, stage.example_inputs, stage.input_names, stage.output_names, shards)
    env = dict(zip(stage.input_names, stage.example_inputs))
    files, shard_meta = [], []
    for k in range(len(pieces)):
        piece = promote_piece(pieces[k])
        pieces[k] = None
        part, outs = _piece_stage(stage, piece, tuple(env[n] for n in piece.input_names))
        env.update(zip(piece.output_names, outs))
        sub = f"{stage.name}.shard{k}"
        (Path(bundle_dir) / sub).mkdir(parents=True, exist_ok=True)
        opts = dict(options)
        if calib is not None:
            opts["calibration"] = {stage.name: _calibration_for(piece, calib)}
            calib = _advance(piece, calib)
        art = tgt.compile(part, plan, Path(bundle_dir) / sub, opts)
        files += [f"{sub}/{f}" for f in art.files]
        shard_meta.append({**describe([piece])[0], "index": k, "folder": sub, "artifact": art.to_dict()})
        log.info("%s: shard %d/%d (groups %s) compiled", stage.name, k + 1, shards, piece.groups)
        del piece, part
    meta = {SHARD_KEY: shard_meta, "shard_count": shards, "shard_host_inputs": host}
    first = shard_meta[0]["artifact"]["metadata"]
    meta.update({k: v for k, v in first.items() if k not in ("partition", "host_inputs", "placement")})
    quant = shard_meta[0]["artifact"]["quant"]
    return Artifact(stage.name, tgt.name, files, stage.contract(), quant, meta)


def _stage_calibration(stage: Stage, plan: Any, options: dict[str, Any]) -> list[dict] | None:
    """The whole stage's recorded calibration inputs when the target will quantize, else None."""
    if plan is None:
        return None
    calib = options.get("calibration")
    if calib is None and options.get("pipeline") is not None:
        from s2dit_deploy.recording import record_inputs
        from s2dit_deploy.targets.qnn.calibration import DEFAULTS

        pipe = options["pipeline"]
        calib = record_inputs(pipe, DEFAULTS["prompt"], DEFAULTS["num_chunks"], pipe.config.steps, DEFAULTS["seed"])
    if calib is None:
        return None
    samples = calib[stage.name] if isinstance(calib, dict) else list(calib)
    limit = int(options.get("calibration_samples", 0) or 0)
    if limit and len(samples) > limit:
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    return [dict(s) for s in samples]


def _advance(piece: Piece, samples: list[dict]) -> list[dict]:
    """Push every calibration sample through the float shard: the next shard's real inputs."""
    out = []
    for s in samples:
        named = {n: torch.as_tensor(s[n]) for n in piece.input_names}
        out.append({**s, **torch_piece_run(piece, named)})
    return out


class ShardedRunner:
    """The shards' runners chained on named numpy tensors (the stage's contract in and out)."""

    def __init__(self, runners: list[Any], shard_meta: list[dict[str, Any]], output_names: list[str],
                 prepare=None):
        self.capabilities = frozenset()
        self.prepare = prepare
        self.shards = [_Shard(m["inputs"], m["outputs"], r) for m, r in zip(shard_meta, runners)]
        self.output_names = output_names
        self.label = getattr(runners[0], "label", "")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.prepare is not None:  # e.g. QNN: timestep features computed on the host from t
            inputs = {k: np.asarray(v) for k, v in self.prepare(dict(inputs)).items()}
        return run_chain(self.shards, inputs, lambda shard, named: shard.runner.run(named), self.output_names)


class _Shard:
    def __init__(self, inputs: list[str], outputs: list[str], runner: Any):
        self.input_names, self.output_names, self.runner = list(inputs), list(outputs), runner


def is_sharded(artifact: Artifact) -> bool:
    return bool(artifact.metadata.get(SHARD_KEY))


def load_sharded(tgt: Any, artifact: Artifact, bundle_dir: Path, **kwargs: Any) -> ShardedRunner:
    """One runner per shard (the target's own ``load`` on each shard's artifact), chained.

    The manifest is untrusted: every shard folder must lie inside the bundle and every shard
    file must be one of the artifact's listed (hashed) files."""
    metas = artifact.metadata[SHARD_KEY]
    listed = set(artifact.files)
    runners = []
    for k, m in enumerate(metas):
        where = f"artifacts.{artifact.stage}.metadata.shards[{k}]"
        folder = resolve_inside(bundle_dir, m["folder"], f"{where}.folder")
        sub = Artifact.from_dict(m["artifact"])
        unlisted = [f for f in sub.files if f"{m['folder']}/{f}" not in listed]
        if unlisted:
            raise InputError(f"{where}: shard files {unlisted} are not listed (and hashed) in artifacts."
                             f"{artifact.stage}.files; the manifest was edited")
        runners.append(tgt.load(sub, folder, **kwargs))
    host = artifact.metadata.get("shard_host_inputs") or {}
    prepare = (lambda named: tgt.host_transform(host, named)) if host else None
    return ShardedRunner(runners, metas, [s["name"] for s in artifact.contract["outputs"]], prepare)


def auto_shards(stage: Stage, bound_bytes: int, bytes_per_weight: float) -> int:
    """Fewest shards of ``dit_step`` whose weights (at the target's storage width) fit the bound."""
    if stage.name != "dit_step":
        return 1
    return pieces_for_bound(stage.module, bound_bytes, bytes_per_weight)


__all__ = ["SHARD_KEY", "ShardedRunner", "auto_shards", "compile_sharded", "is_sharded", "load_sharded"]
