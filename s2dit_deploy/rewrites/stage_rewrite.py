"""Rewrite a deployment ``Stage`` for the Neural Engine: a device-layout module plus its I/O maps.

``rewrite_stage(stage, options)`` returns a ``DeviceStage`` whose module takes and returns the
device tensors positionally (the order of the stage's contract), and the ``IOMap`` lists that turn
host tensors into device tensors and back. ``run_host`` runs it in torch on host tensors, which
is what the equivalence tests compare against the float stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..stages import Stage
from .ane_decoder import rewrite_decoder_stage
from .ane_dit import AneOptions, AneS2DiT, rewrite_dit
from .device_io import IOMap, feature_name, identity

log = logging.getLogger(__name__)


@dataclass
class DeviceStage:
    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    inputs: list[IOMap]
    outputs: list[IOMap]
    layout: str
    output_dtypes: tuple[str, ...] = ()
    node_blocks: dict[str, str] = field(default_factory=dict)  # filled by the converter

    def run_host(self, named: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Host-named tensors in, host-named tensors out, through the device module in torch."""
        dev = []
        for m in self.inputs:
            arr = m.to_device(named[m.name].detach().cpu().numpy())
            t = torch.from_numpy(arr)
            dev.append(t.to(dtype) if t.is_floating_point() else t)
        with torch.no_grad():
            outs = self.module.to(dtype)(*dev)
        return {m.name: torch.from_numpy(m.to_host(o.float().numpy())) for m, o in zip(self.outputs, outs)}


class AneDiTStepStage(nn.Module):
    """Positional device tensors -> (velocity, entries...) through ``AneS2DiT.step``."""

    def __init__(self, dit: AneS2DiT, cache_keys: list[str], entry_keys: list[str], fold_io: bool = False):
        super().__init__()
        self.dit, self.cache_keys, self.entry_keys = dit, list(cache_keys), list(entry_keys)
        self.fold_io = fold_io

    def forward(self, x, t, context, hi_cos, hi_sin, lo_cos, lo_sin, *cache):
        if self.fold_io:  # host layouts in: (B, L, C) -> (B, C, 1, L), (N, d) -> (1, 1, d, N)
            # contiguous: a chunked program may carry these to a later piece, and a Core ML input
            # cannot have a non-contiguous dim order
            context = context.transpose(1, 2).unsqueeze(2).contiguous()
            hi_cos, hi_sin, lo_cos, lo_sin = (r.transpose(0, 1).unsqueeze(0).unsqueeze(0).contiguous()
                                              for r in (hi_cos, hi_sin, lo_cos, lo_sin))
        v, entries = self.dit.step(x, t, context, hi_cos, hi_sin, lo_cos, lo_sin, dict(zip(self.cache_keys, cache)))
        return (v, *(entries[k] for k in self.entry_keys))


def _dit_maps(stage: Stage, dit: AneS2DiT) -> tuple[list[IOMap], list[IOMap]]:
    cfg, grid = dit.cfg, dit.grid
    n_hi = grid[0] * grid[1] * grid[2]
    h, d = cfg.num_heads, cfg.head_dim

    def cache_map(name: str, shape: tuple[int, ...]) -> IOMap:
        kind = name.rsplit(".", 1)[-1]
        dn = feature_name(name)
        if kind == "kv":
            if len(shape) == 5:  # cache (W, B, H, d, d) -> (W, B*H, d_v, d_k)
                return IOMap(name, dn, shape, (shape[0], shape[1] * h, d, d), (0, 1, 2, 4, 3), 1.0 / n_hi)
            return IOMap(name, dn, shape, shape, (0, 1, 3, 2), 1.0 / n_hi)  # entry (B, H, d, d)
        if kind == "ksum":
            return IOMap(name, dn, shape, shape, None, 1.0 / n_hi)
        if kind == "vtail":
            return IOMap(name, dn, shape, (*shape[:3], shape[3] * shape[4]))
        if kind == "v":  # (B, H, n, d) -> channel-first (B, H, d, n)
            return IOMap(name, dn, shape, (shape[0], shape[1], shape[3], shape[2]), (0, 1, 3, 2))
        return identity(name, shape)  # k (token-major), window_valid

    ins: list[IOMap] = []
    for spec in stage.inputs:
        name, shape = spec.name, tuple(spec.shape)
        if name == "x":
            b, c, f, hh, ww = shape
            ins.append(IOMap(name, "x", shape, (b, c, f * hh, ww)))
        elif name == "t":
            if dit.folded:
                sched = tuple(dit.opts.fold_schedule)
                ins.append(IOMap(name, "t_onehot", shape, (shape[0], len(sched), 1, 1), onehot=sched))
            else:
                ins.append(IOMap(name, "t_freq", shape, (shape[0], cfg.freq_dim, 1, 1), sinusoidal=cfg.freq_dim))
        elif name == "context":
            b, length, td = shape
            ins.append(IOMap(name, "context", shape, shape) if dit.opts.fold_io else
                       IOMap(name, "context", shape, (b, td, 1, length), (0, 2, 1)))
        elif name in ("hi_cos", "hi_sin", "lo_cos", "lo_sin"):
            n, dd = shape
            ins.append(IOMap(name, name, shape, shape) if dit.opts.fold_io else
                       IOMap(name, name, shape, (1, 1, dd, n), (1, 0)))
        elif name.startswith("cache."):
            ins.append(cache_map(name, shape))
        else:
            raise KeyError(f"dit_step input {name!r} has no device mapping")
    outs: list[IOMap] = []
    for spec in stage.outputs:
        name, shape = spec.name, tuple(spec.shape)
        if name == "velocity":
            b, c, f, hh, ww = shape
            outs.append(IOMap(name, "velocity", shape, (b, c, f * hh, ww)))
        else:
            outs.append(cache_map(name, shape))
    return ins, outs


def _examples(stage: Stage, maps: list[IOMap]) -> tuple[torch.Tensor, ...]:
    named = dict(zip(stage.input_names, stage.example_inputs))
    return tuple(torch.from_numpy(m.to_device(named[m.name].numpy())) for m in maps)


def identity_stage(stage: Stage) -> DeviceStage:
    ins = [identity(s.name, tuple(s.shape)) for s in stage.inputs]
    outs = [identity(s.name, tuple(s.shape)) for s in stage.outputs]
    return DeviceStage(stage.name, stage.module, tuple(stage.example_inputs), ins, outs, "stock", _dtypes(stage))


def _dtypes(stage: Stage) -> tuple[str, ...]:
    return tuple(s.dtype for s in stage.outputs)


def rewrite_stage(stage: Stage, options: AneOptions | None = None) -> DeviceStage:
    """The ANE form of a stage (dit_step, decoder); other stages pass through unchanged."""
    options = options or AneOptions()
    if stage.name == "dit_step":
        dit = stage.module.dit
        named = dict(zip(stage.input_names, stage.example_inputs))
        _, _, f, hh, ww = named["x"].shape
        grid = dit.cfg.token_grid(f, hh, ww)
        window = named["cache.window_valid"].shape[0]
        ane = rewrite_dit(dit, grid, window, options)
        mod = AneDiTStepStage(ane, stage.module.cache_keys, stage.module.entry_keys, options.fold_io).eval()
        ins, outs = _dit_maps(stage, ane)
        return DeviceStage(stage.name, mod, _examples(stage, ins), ins, outs, "ane_channels_first_B_C_1_S",
                           _dtypes(stage))
    if stage.name == "decoder":
        mod, ins, outs = rewrite_decoder_stage(stage)
        return DeviceStage(stage.name, mod, _examples(stage, ins), ins, outs, "ane_frames_as_batch_T_C_H_W",
                           _dtypes(stage))
    log.info("stage %s has no ANE rewrite; compiled as is", stage.name)
    return identity_stage(stage)


def max_abs_error(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per output: max |ref - got| / max(|ref|, 1e-12) (error relative to the output's scale)."""
    out = {}
    for k, r in ref.items():
        g = got[k]
        scale = max(float(r.abs().max()), 1e-12)
        out[k] = float(np.abs(r.double().numpy() - g.double().numpy()).max()) / scale
    return out
