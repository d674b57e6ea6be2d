"""`s2dit-deploy train {codec,pretrain,distill,decoder}`: the reference-training recipes.

Each recipe takes an optional JSON config (``--config``; any subset of its dataclass fields) and a
few common overrides. Runs resume from their output folder. The same entry runs under torchrun::

    torchrun --nproc_per_node 2 -m s2dit_deploy.commands.train pretrain --config cfg.json
"""

from __future__ import annotations

import argparse
import sys

NAME = "train"

RECIPES = {
    "codec": ("train the latent codec (Wan2.1 interface: 16 ch, 4x8x8, causal)", "CodecTrainConfig", "codec_train", "train_codec"),
    "pretrain": ("flow-matching pretraining of S2DiT + text encoder (block-causal, EMA)", "PretrainConfig", "pretrain", "train_pretrain"),
    "distill": ("few-step streaming distillation: Self-Forcing rollouts + DMD (4/2/1 steps)", "DistillConfig", "distill", "train_distill"),
    "decoder": ("efficient decoder against the frozen codec encoder (L1 + perceptual [+ GAN])", "DecoderTrainConfig", "decoder_train", "train_decoder"),
    "classifier": ("the metrics classifier of the FVD proxy and attribute accuracy (synthetic clips)", "ClassifierTrainConfig", "classifier", "train_classifier"),
    "latent-flow": ("a DiT of any shape on latents sampled from a trained model (flow matching, or velocity KD "
                    "from --kd-from: the dense search teacher, a supernet to prune, direct baselines)",
                    "LatentFlowConfig", "latent_flow", "train_latent_flow"),
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="run a reference-training recipe", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipes(p)
    return p


def add_recipes(p: argparse.ArgumentParser) -> None:
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, (help_text, *_rest) in RECIPES.items():
        r = recipes.add_parser(name, help=help_text, description=help_text)
        r.add_argument("--config", default=None, help="JSON file with any fields of the recipe's config dataclass")
        r.add_argument("--out", default=None, help="output folder (checkpoints, log.jsonl, config.json)")
        r.add_argument("--steps", type=int, default=None, help="total optimizer steps")
        r.add_argument("--batch-size", type=int, default=None, help="global batch size")
        r.add_argument("--seed", type=int, default=None)
        if name != "latent-flow":  # its clips are the latent set's, sampled at the model's resolution
            r.add_argument("--height", type=int, default=None, help="clip height (multiple of 32)")
            r.add_argument("--width", type=int, default=None, help="clip width (multiple of 32)")
        if name not in ("codec", "classifier", "latent-flow"):
            r.add_argument("--codec", default=None, help="codec run folder ('none': untrained, tests only)")
        if name == "latent-flow":
            r.add_argument("--init", default=None, help="checkpoint whose DiT weights start the run")
            r.add_argument("--kd-from", default=None, help="checkpoint whose velocity is the target (KD)")
        if name in ("pretrain", "decoder", "latent-flow"):
            r.add_argument("--model", default=None, help="model card whose architecture is trained (default s2dit-small)")
        if name == "distill":
            r.add_argument("--teacher", default=None, help="pretrain run folder (its EMA model is the teacher)")
        r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        r.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON")


def run(args: argparse.Namespace) -> tuple[object, str]:
    import dataclasses
    import importlib

    import torch

    from s2dit_deploy.reference_training import configs

    _, cls_name, module, fn = RECIPES[args.recipe]
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"out": args.out, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                 "data.height": getattr(args, "height", None), "data.width": getattr(args, "width", None)}
    for key in ("codec", "model", "teacher", "init", "kd_from"):
        overrides[key] = getattr(args, key, None)
    cls = getattr(configs, cls_name)
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in overrides.items() if k in names or (k.startswith("data.") and "data" in names)}
    cfg = configs.load_config(cls, args.config, **overrides)
    train = getattr(importlib.import_module(f"s2dit_deploy.reference_training.{module}"), fn)
    result = train(cfg, progress=not getattr(args, "json", False))
    result = {k: v for k, v in result.items() if k not in ("history",)}
    if "losses" in result:
        result["losses"] = [round(x, 6) for x in result["losses"]]
    text = f"{args.recipe}: {cfg.steps} steps -> {result.get('out')} ({result.get('seconds', 0):.0f} s)"
    return result, text


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m s2dit_deploy.commands.train``), e.g. for torchrun."""
    import json
    import logging

    parser = argparse.ArgumentParser(prog="s2dit-deploy train", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_recipes(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    result, text = run(args)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write((json.dumps(result) if args.json else text) + "\n")  # CLI output, rank 0 only
    from s2dit_deploy.reference_training.common import shutdown_distributed

    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
