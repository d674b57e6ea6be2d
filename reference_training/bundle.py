"""Assemble and score the bundled default: distilled DiT + text encoder + efficient decoder.

``python -m s2dit_deploy.reference_training.bundle --pretrain runs/pretrain --distill runs/distill
--decoder runs/decoder --classifier runs/classifier --out model_zoo/checkpoints/s2dit-small``
writes the checkpoint (fp16 safetensors, < 20 MB per file) and ``bars.json`` next to it with the
issue's figures: FVD-proxy, attribute accuracy and boundary jump of 4-step streaming samples of the
distilled model vs the pretrained model (multi-step Euler) vs random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from ..model_zoo.checkpoint import read_config, save_checkpoint
from ..model_zoo.registry import build_stage, load_stage
from ..model_zoo.sampler import FewStepSchedule
from .evaluate import evaluate_variants
from .metrics import load_classifier

log = logging.getLogger(__name__)


def load_decoder(folder: str, mcfg) -> torch.nn.Module:
    from safetensors.torch import load_file

    dec = build_stage(mcfg, "decoder")
    dec.load_state_dict(load_file(str(Path(folder) / "decoder.safetensors")))
    return dec.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pretrain", required=True)
    p.add_argument("--distill", default=None, help="distill run folder; without it the pretrained DiT is shipped")
    p.add_argument("--decoder", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--json", action="store_true", help="print the bars as JSON (default: one line per variant)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pre = Path(args.pretrain) / "model"
    mcfg = dataclasses.replace(read_config(pre), steps=4)
    te = load_stage(mcfg, pre, "text_encoder")
    teacher = load_stage(mcfg, pre, "dit")
    student = load_stage(mcfg, Path(args.distill) / "model", "dit") if args.distill else teacher
    decoder = load_decoder(args.decoder, mcfg)
    out = Path(args.out)
    save_checkpoint(out, mcfg, {"dit": student, "text_encoder": te, "decoder": decoder}, dtype=torch.float16)
    sizes = {f.name: round(f.stat().st_size / 2**20, 2) for f in out.iterdir()}
    log.info("wrote %s: %s MiB", out, sizes)
    if args.no_eval:
        return 0
    torch.manual_seed(0)
    random_dit, random_te = build_stage(mcfg, "dit").eval(), build_stage(mcfg, "text_encoder").eval()
    four = FewStepSchedule(steps=4)
    variants = {
        "distilled, 4-step streaming" if args.distill else "pretrained, 4-step streaming": (te, student, decoder, four),
        f"pretrained, {args.teacher_steps}-step Euler streaming": (te, teacher, decoder,
                                                                   FewStepSchedule(steps=args.teacher_steps, shift=3.0, rule="euler")),
        "pretrained, 4-step streaming (no distillation)": (te, teacher, decoder, four),
        "random weights, 4-step streaming": (random_te, random_dit, decoder, four),
    }
    if not args.distill:
        variants.pop("pretrained, 4-step streaming (no distillation)")
    bars = evaluate_variants(mcfg, load_classifier(args.classifier), variants, args.count, args.chunks)
    bars["file_sizes_mib"] = sizes
    (Path(args.distill or args.pretrain) / "bars.json").write_text(json.dumps(bars, indent=2) + "\n")
    if args.json:  # this module's CLI output
        sys.stdout.write(json.dumps(bars, indent=2) + "\n")
    else:
        for name, b in bars.items():
            if isinstance(b, dict) and "fvd_proxy" in b:
                sys.stdout.write(f"{name:<48} FVD-proxy {b['fvd_proxy']:8.2f}  attribute acc "
                                 f"{b['attribute_accuracy']['mean']:.3f}  boundary jump {b['boundary_jump']:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
