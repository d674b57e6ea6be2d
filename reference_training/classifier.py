"""Train the metrics classifier on the synthetic attribute labels (FVD proxy + attribute accuracy).

Why in-repo: I3D (the FVD network) cannot be downloaded here, and a classifier trained on the
synthetic labels measures exactly what the captions promise (shape, colour, direction, motion,
background). Its trunk also serves as the perceptual feature network of decoder training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import append_jsonl, step_generator  # noqa: F401  (step_generator kept for symmetry)
from .configs import ClassifierTrainConfig, write_config
from .data import SyntheticVideoDataset, global_batch
from .metrics import VideoClassifier, attribute_accuracy, classifier_loss, save_classifier

log = logging.getLogger(__name__)


def train_classifier(cfg: ClassifierTrainConfig, progress: bool = True) -> dict:
    out = Path(cfg.out)
    write_config(out, cfg)
    torch.manual_seed(cfg.seed)
    model = VideoClassifier(motion=cfg.motion)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    data = SyntheticVideoDataset(cfg.data.height, cfg.data.width, cfg.data.chunks, seed=cfg.data.seed + 101)
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="classifier", disable=not progress):
        batch = global_batch(data, step, cfg.batch_size)
        loss = classifier_loss(model, batch["video"], batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0:
            log.info("classifier step %d loss %.4f", step, loss.item())
            append_jsonl(out / "log.jsonl", {"step": step, "loss": loss.item(), "time": time.perf_counter() - t0})
        if (step + 1) % 50 == 0:  # stop any time and keep a usable classifier
            save_classifier(out, model)
    model.eval()
    save_classifier(out, model)
    held_out = SyntheticVideoDataset(cfg.data.height, cfg.data.width, cfg.data.chunks, seed=cfg.data.seed + 202, caption_drop=0.0)
    batch = global_batch(held_out, 0, 64)
    acc = attribute_accuracy(model, batch["video"], batch["labels"])
    log.info("classifier held-out accuracy %s", acc)
    return {"out": str(out), "accuracy": acc, "seconds": time.perf_counter() - t0}
