"""Paper-scale conversion without the float model in RAM: the ANE DiT step built directly.

For ``s2dit-mobile`` (1.8B params) holding the float model, its rewrite and coremltools' copies
at once does not fit a 24 GB machine. ``direct_dit_stage`` builds only the rewritten module, with a
seeded random init in ``dtype`` (fp16 halves the weights), and derives the stage contract from
shapes alone (the stock model lives on the meta device). The graph is the same one ``compile``
converts; only the weights differ (there are no trained mobile weights anyway).

    python -m s2dit_deploy.targets.coreml.direct s2dit-mobile --residency /tmp/res_mobile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import logging
import time

import torch
from s2dit_deploy.model_zoo.registry import get_card
from torch import nn

from s2dit_deploy.rewrites.ane_dit import AneOptions, AneS2DiT
from s2dit_deploy.rewrites.stage_rewrite import AneDiTStepStage, DeviceStage, _dit_maps
from s2dit_deploy.stages import Stage, TensorSpec, dit_step_inputs

log = logging.getLogger(__name__)


class _MetaHolder(nn.Module):
    def __init__(self, dit, cache_keys, entry_keys):
        super().__init__()
        self.dit, self.cache_keys, self.entry_keys = dit, cache_keys, entry_keys


def shape_only_stage(cfg) -> Stage:
    """The dit_step Stage (contract, zero example inputs) without materialising the float model."""
    from s2dit_deploy.model_zoo.dit import S2DiT

    with torch.device("meta"):
        stock = S2DiT(cfg.dit)
    h, w = cfg.latent_hw
    shapes = stock.cache_shapes(1, (h, w), cfg.stream)
    cache = {k: torch.zeros(s) for k, s in shapes.items()}
    ctx = torch.zeros(1, cfg.text_encoder.max_position_embeddings, cfg.dit.text_dim)
    named = dit_step_inputs(cfg, torch.zeros(1, *cfg.chunk_latent_shape), 1.0, ctx, cache, 0)
    entry_keys = [k for k in shapes if k != "window_valid"]
    win = cfg.stream.window_chunks
    outs = [TensorSpec("velocity", tuple(named["x"].shape), "float32")]
    for k in entry_keys:
        s, kind = shapes[k], k.rsplit(".", 1)[-1]
        if kind in ("kv", "ksum"):
            s = s[1:]
        elif kind in ("k", "v"):
            s = (s[0], s[1], s[2] // win, s[3])
        outs.append(TensorSpec(f"entry.{k}", tuple(s), "float32"))
    return Stage("dit_step", _MetaHolder(stock, list(shapes), entry_keys), tuple(named.values()),
                 tuple(TensorSpec.of(n, v) for n, v in named.items()), tuple(outs),
                 tuple((f"cache.{k}", f"entry.{k}") for k in entry_keys))


@torch.no_grad()
def direct_dit_stage(cfg, dtype=torch.float16, opts: AneOptions | None = None, seed: int = 0) -> DeviceStage:
    opts = opts or AneOptions()
    stage = shape_only_stage(cfg)
    x = stage.example_inputs[0]
    grid = cfg.dit.token_grid(*x.shape[2:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ane = AneS2DiT(cfg.dit, grid, cfg.stream.window_chunks, opts).to(dtype)
        for p in ane.parameters():
            p.normal_(0.0, 0.02)
    if opts.fold_schedule is not None:
        ane.fold_schedule(tuple(opts.fold_schedule))
    mod = AneDiTStepStage(ane.eval(), stage.module.cache_keys, stage.module.entry_keys).eval()
    ins, outs = _dit_maps(stage, ane)
    examples = tuple(torch.from_numpy(m.to_device(t.numpy())).to(dtype) if t.is_floating_point() else t
                     for m, t in zip(ins, stage.example_inputs))
    return DeviceStage("dit_step", mod, examples, ins, outs, "ane_channels_first_B_C_1_S",
                       tuple(s.dtype for s in stage.outputs))


def main(argv=None) -> int:
    from s2dit_deploy.analysis.ane_residency import analyze, write_report

    from .convert import CoreMLOptions, convert, peak_rss_mb

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", default="s2dit-mobile")
    p.add_argument("--dim", type=int, default=None, help="reduced width (same layout, head size)")
    p.add_argument("--dtype", default="fp32", choices=("fp16", "fp32"),
                   help="torch weight dtype (fp16 trips coremltools 9.0: fp32 weight vs fp16 bias in conv)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--residency", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s")
    opts = CoreMLOptions.from_dict(dict(kv.split("=", 1) for kv in args.option))
    cfg = get_card(args.model).config
    if args.dim:
        d = cfg.dit
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(
            d, dim=args.dim, num_heads=max(1, args.dim // d.head_dim), ffn_dim=d.ffn_dim * args.dim // d.dim))
    t0 = time.time()
    dstage = direct_dit_stage(cfg, torch.float16 if args.dtype == "fp16" else torch.float32, opts.ane())
    n_params = sum(p.numel() for p in dstage.module.parameters())
    build_s = time.time() - t0
    mlmodel = convert(dstage, opts)
    if args.out:
        mlmodel.save(args.out)
    result = {"model": args.model, "dim": cfg.dit.dim, "heads": cfg.dit.num_heads, "params": n_params,
              "build_s": round(build_s, 1), "convert_s": round(time.time() - t0 - build_s, 1),
              "peak_rss_mb": round(peak_rss_mb())}
    if args.residency:
        rep = analyze(mlmodel._mil_program, title=f"{args.model} dit_step (dim {cfg.dit.dim}, rewritten, direct)",
                      node_blocks=dstage.node_blocks)
        write_report(rep, args.residency)
        result["residency"] = {k: rep["summary"][k] for k in
                               ("ops", "op_share_ane", "flops", "flop_share_ane", "rank5_tensors", "rule_hits")}
    # this module's CLI output: one JSON line with --json, indented otherwise
    sys.stdout.write(json.dumps(result, default=str, indent=None if args.json else 1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
