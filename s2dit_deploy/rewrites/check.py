"""Check a rewrite against its float model on a real stream state (the numbers in the issue note).

    python -m s2dit_deploy.rewrites.check s2dit-small --resolution 288x512 --fp16

prints, as JSON: the fp32 max error of every stage output relative to its scale, and with
``--fp16`` whether the rewritten stage stays finite in fp16 and its PSNR against fp32 (and the same
for the stock model, which overflows in the linear-attention sums).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import logging
import math
import time

import torch

from ..model_zoo.pipeline import Pipeline
from ..model_zoo.registry import get_card, load_stage
from ..stages import build_stages, dit_step_inputs
from .ane_dit import AneOptions
from .stage_rewrite import max_abs_error, rewrite_stage

log = logging.getLogger(__name__)


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    if not torch.isfinite(x).all():
        return float("nan")
    rmse = (ref - x).pow(2).mean().sqrt().item()
    return float("inf") if rmse == 0 else 20 * math.log10(ref.abs().max().item() / rmse)


def stream_state_inputs(pipe: Pipeline, seed: int = 1, t: float = 0.63, chunks: int = 2) -> dict[str, torch.Tensor]:
    """dit_step inputs after ``chunks`` committed chunks (a filled window, realistic cache values)."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.config
    ctx = torch.randn(1, cfg.text_encoder.max_position_embeddings, cfg.dit.text_dim, generator=g)
    cache = pipe.dit.init_cache(1, cfg.latent_hw, cfg.stream)
    with torch.no_grad():
        for c in range(chunks):
            x0 = torch.randn(1, *cfg.chunk_latent_shape, generator=g)
            _, entries = pipe.dit.step(x0, 0.0, ctx, cache, c * cfg.stream.chunk_frames)
            cache = pipe.dit.push_cache(cache, entries)
    x = torch.randn(1, *cfg.chunk_latent_shape, generator=g)
    return dit_step_inputs(cfg, x, t, ctx, cache, chunks * cfg.stream.chunk_frames)


def dit_pipeline(name: str, resolution: tuple[int, int] | None = None) -> Pipeline:
    cfg = get_card(name).config
    if resolution:
        cfg = dataclasses.replace(cfg, height=resolution[0], width=resolution[1])
    return Pipeline(cfg, None, load_stage(cfg, None, "dit"), None)


def max_denominator(stage, named) -> float:
    """Largest phi(q)^T sum_n phi(k_n) of the stock LCHA readout in fp32 (overflows fp16 if > 65504)."""
    from ..model_zoo import linear_attention as la

    seen = [0.0]
    orig = la.linear_attention_readout

    def spy(phi_q, phi_q_rot, kv, ksum, eps):
        den = torch.einsum("bhnd,bhd->bhn", phi_q, ksum)
        seen[0] = max(seen[0], float(den.abs().max()), float(kv.abs().max()))
        return orig(phi_q, phi_q_rot, kv, ksum, eps)

    la.linear_attention_readout = spy
    try:
        stage.run_float(named)
    finally:
        la.linear_attention_readout = orig
    return seen[0]


def check(name: str, resolution=None, fp16: bool = False, opts: AneOptions | None = None) -> dict:
    pipe = dit_pipeline(name, resolution)
    stage = build_stages(pipe, ("dit_step",))["dit_step"]
    named = stream_state_inputs(pipe)
    t0 = time.time()
    ds = rewrite_stage(stage, opts or AneOptions())
    ref = stage.run_float(named)
    err = max_abs_error(ref, ds.run_host(named))
    worst = max(err, key=err.get)
    out = {"model": name, "resolution": f"{pipe.config.height}x{pipe.config.width}",
           "max_rel_err_fp32": err[worst], "worst_output": worst, "velocity_rel_err_fp32": err["velocity"],
           "seconds": round(time.time() - t0, 1)}
    out["stock_max_linear_attention_denominator"] = max_denominator(stage, named)
    out["fp16_max"] = 65504.0
    if fp16:
        r32 = ds.run_host(named, torch.float32)
        r16 = ds.run_host(named, torch.float16)
        out["rewritten_fp16_finite"] = all(bool(torch.isfinite(v).all()) for v in r16.values())
        out["rewritten_fp16_psnr_velocity"] = psnr(r32["velocity"], r16["velocity"])
        out["rewritten_fp16_psnr_min_entry"] = min(psnr(r32[k], r16[k]) for k in r32 if k != "velocity")
        stock = stage.module.half()
        with torch.no_grad():
            outs = stock(*(named[n].half() if named[n].is_floating_point() else named[n] for n in stage.input_names))
        stage.module.float()
        out["stock_fp16_finite"] = all(bool(torch.isfinite(o).all()) for o in outs)
        out["stock_fp16_psnr_velocity"] = psnr(ref["velocity"], outs[0].float())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--resolution", default=None, help="HxW, e.g. 288x512")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--batched-heads", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = tuple(int(v) for v in args.resolution.split("x")) if args.resolution else None
    result = check(args.model, res, args.fp16, AneOptions(split_heads=not args.batched_heads))
    text = json.dumps(result) if args.json else json.dumps(result, indent=1)
    sys.stdout.write(text + "\n")  # this module's CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
