"""Chunked Core ML DiT: one ML program per group range, chained by the host (ml-stable-diffusion's
``--chunk-unet``).

A ``weight.bin`` over 2 GiB converts but fails to load on the device, and an iPhone loads smaller
programs with less peak memory. So a paper-scale ``dit_step`` becomes ``dit_step.K.mlpackage``
files, each below ``chunk_mb`` of fp16 weights, split after the ANE rewrite by
``rewrites.graph_split`` (every chunk keeps the device layout; the tensors between chunks travel
in the program's I/O dtype, as they would between programs on the phone). Converting chunk by
chunk also bounds the converter's peak memory to one chunk's copies.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2dit_deploy.model_zoo.compute_dtype import has_compute_hooks, promoted, weights_dtype
from s2dit_deploy.rewrites import DeviceStage
from s2dit_deploy.rewrites.device_io import IOMap, feature_name
from s2dit_deploy.rewrites.graph_split import (Piece, describe, pieces_for_bound, promote_piece, run_chain,
                                                split_graph)
from s2dit_deploy.stages import Stage

from .options import CoreMLOptions

log = logging.getLogger(__name__)


def chunk_count(stage: Stage, dstage: DeviceStage, opts: CoreMLOptions) -> int:
    """``opts.chunks`` when set, else the fewest chunks whose fp16 weights fit ``opts.chunk_mb``."""
    if stage.name != "dit_step":
        if opts.chunks > 1:
            log.info("coreml: chunks applies to dit_step only; %s stays one program", stage.name)
        return 1
    if opts.chunks:
        return opts.chunks
    return pieces_for_bound(dstage.module, int(opts.chunk_mb * 2**20), bytes_per_weight=2.0)


def _piece_stage(dstage: DeviceStage, piece: Piece, examples: tuple[torch.Tensor, ...]
                 ) -> tuple[DeviceStage, tuple[torch.Tensor, ...]]:
    """A piece as a DeviceStage whose I/O are already device tensors (identity maps), and its
    outputs on ``examples`` (the next piece's example inputs)."""
    ins = [IOMap(n, feature_name(n), tuple(x.shape), tuple(x.shape)) for n, x in zip(piece.input_names, examples)]
    with torch.no_grad():
        outs = piece.module(*examples)
    out_maps = [IOMap(n, feature_name(n), tuple(o.shape), tuple(o.shape)) for n, o in zip(piece.output_names, outs)]
    dtypes = tuple(str(o.dtype).replace("torch.", "") for o in outs)
    part = DeviceStage(f"{dstage.name}.{piece.index}", piece.module, examples, ins, out_maps, dstage.layout, dtypes)
    return part, outs


def uses_splitter(stage: Stage, dstage: DeviceStage, opts: CoreMLOptions) -> bool:
    """Whether ``device_parts`` cuts the stage with the graph splitter (its parts are then
    GraphModule pieces, not the rewritten modules): a chunked DiT, or a DiT stored in fp16/bf16,
    which is promoted piece by piece even as one chunk."""
    if chunk_count(stage, dstage, opts) > 1:
        return True
    fp32 = weights_dtype(dstage.module) == torch.float32 and not has_compute_hooks(dstage.module)
    return stage.name == "dit_step" and not fp32


def device_parts(stage: Stage, dstage: DeviceStage, opts: CoreMLOptions
                 ) -> Iterator[tuple[DeviceStage, dict[str, Any] | None]]:
    """The programs to convert for a stage, one at a time: ``(part, chunk description or None)``.

    Conversion traces in fp32 (coremltools then stores fp16): a stage with fp16/bf16 weights is
    promoted piece by piece, so at most one chunk exists in fp32 beside the checkpoint's copy."""
    n = chunk_count(stage, dstage, opts)
    if not uses_splitter(stage, dstage, opts):
        # a small stage (text encoder, decoder): promoted whole, without the host widening hooks
        fp32 = weights_dtype(dstage.module) == torch.float32 and not has_compute_hooks(dstage.module)
        yield (dstage if fp32 else dataclasses.replace(dstage, module=promoted(dstage.module))), None
        return
    in_names = [m.device_name for m in dstage.inputs]
    out_names = [m.device_name for m in dstage.outputs]
    pieces = split_graph(dstage.module, dstage.example_inputs, in_names, out_names, n)
    described = describe(pieces) if n > 1 else [None] * n
    env = dict(zip(in_names, dstage.example_inputs))
    for k in range(len(pieces)):
        piece32 = promote_piece(pieces[k])
        pieces[k] = None  # the traced piece is not needed once promoted (its weights stay in the model)
        part, outs = _piece_stage(dstage, piece32, tuple(env[i] for i in piece32.input_names))
        env.update(zip(piece32.output_names, outs))
        if n == 1:  # one piece: keep the stage's own names and maps
            part = dataclasses.replace(dstage, module=piece32.module)
        yield part, described[k]
        del part, piece32


def merge_quant_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage summary from per-chunk ones: a plan layer is unmatched only if no chunk matched it."""
    if not summaries or not summaries[0]:
        return {}
    merged = dict(summaries[0])
    unmatched = set(summaries[0].get("unmatched_layers", []))
    for s in summaries[1:]:
        unmatched &= set(s.get("unmatched_layers", []))
        for key in ("clipped", "act_quantized"):
            merged[key] = list(merged.get(key, [])) + list(s.get(key, []))
        merged["weights"] = {**merged.get("weights", {}), **s.get("weights", {})}
        counts = dict(merged.get("counts", {}))
        for k, v in (s.get("counts") or {}).items():
            counts[k] = counts.get(k, 0) + v
        merged["counts"] = counts
    merged["unmatched_layers"] = sorted(unmatched)
    return merged


# Above this much weight data the chunks are loaded one at a time for each run (and freed after
# it): the reference executor widens constants to float32 at load, so four 1 GB fp16 chunks held
# at once cost ~8 GB beside the float model. Below it they stay loaded (small models, tests).
KEEP_LOADED_BYTES = 1 << 30


class ChainedProgram:
    """The chunks of one stage behind the ``Program.run`` interface (device names in and out)."""

    def __init__(self, paths: list[Path], pieces: list[dict[str, Any]], output_names: list[str], load):
        self.paths, self.output_names, self._load = paths, output_names, load
        size = sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())
        self.keep_loaded = size <= KEEP_LOADED_BYTES
        self.pieces = [_Names(p["inputs"], p["outputs"], path) for p, path in zip(pieces, paths)]
        if self.keep_loaded:
            for piece in self.pieces:
                piece.program = load(str(piece.path))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def one(piece: "_Names", named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            program = piece.program or self._load(str(piece.path))
            try:
                return program.run(named)
            finally:
                del program

        return run_chain(self.pieces, inputs, one, self.output_names)


class _Names:
    def __init__(self, inputs: list[str], outputs: list[str], path: Path):
        self.input_names = [feature_name(n) for n in inputs]  # idempotent on device names
        self.output_names = [feature_name(n) for n in outputs]
        self.path, self.program = path, None


def load_chained(bundle_dir: Path, files: list[str], pieces: list[dict[str, Any]],
                 output_names: list[str], load=None) -> ChainedProgram:
    """The chunks of a stage as one program; ``load(path)`` opens one chunk (default: the Core ML
    reference executor; Core AI passes its runtime's loader)."""
    if load is None:
        from .executor import load_program as load

    return ChainedProgram([Path(bundle_dir) / f for f in files], pieces, output_names, load)
