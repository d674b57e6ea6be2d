"""The bars of the training issue: FVD-proxy, attribute accuracy and boundary jump of streamed samples.

Samples are generated with the deployment path (``S2DiT.step`` + caches + commit at t = 0, then the
efficient decoder chunk by chunk), batched over prompts. Prompts are full captions of held-out
synthetic clips, whose rendered videos are the reference set and whose labels the attributes.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..model_zoo.sampler import FewStepSchedule
from .data import SyntheticVideoDataset, caption
from .distill import self_forcing_rollout
from .metrics import VideoClassifier, attribute_accuracy, boundary_jump, frechet_distance
from .models import token_ids

log = logging.getLogger(__name__)


def reference_set(height: int, width: int, chunks: int, count: int, seed: int = 9001) -> dict:
    ds = SyntheticVideoDataset(height, width, chunks, seed=seed, caption_drop=0.0)
    items = [ds[i] for i in range(count)]
    return {
        "video": torch.stack([it["video"] for it in items]),
        "prompts": [caption(it["params"]) for it in items],
        "labels": {k: torch.tensor([it["labels"][k] for it in items]) for k in items[0]["labels"]},
    }


@torch.no_grad()
def generate_videos(config, text_encoder, dit, decoder, prompts: list[str], chunks: int,
                    schedule: FewStepSchedule, seed: int = 0, batch: int = 8) -> torch.Tensor:
    """(N, 3, 12*chunks, H, W) in [-1, 1], streamed chunk by chunk exactly like the pipeline."""
    out = []
    for i in range(0, len(prompts), batch):
        ctx = text_encoder(token_ids(prompts[i : i + batch], config))
        g = torch.Generator().manual_seed(seed + i)
        z = self_forcing_rollout(dit, ctx, config.chunk_latent_shape, chunks, schedule, config.stream, g, grad=False)
        cache, frames = None, []
        for k in range(chunks):  # the decoder streams with its own cache, as in the pipeline
            cf = config.stream.chunk_frames
            video, cache = decoder(z[:, :, k * cf : (k + 1) * cf], cache)
            frames.append(video)
        out.append(torch.cat(frames, dim=2).clamp(-1, 1))
    return torch.cat(out)


def to_uint8_video(v: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) [-1, 1] -> (T, H, W, 3) uint8 (the pipeline's quantization)."""
    return ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


@torch.no_grad()
def score(classifier: VideoClassifier, videos: torch.Tensor, reference: dict) -> dict:
    """FVD proxy vs the reference videos, attribute accuracy vs the prompts' labels, boundary jump."""
    quantized = torch.stack([torch.from_numpy(to_uint8_video(v)).permute(3, 0, 1, 2) for v in videos]).float() / 127.5 - 1
    f_gen = classifier.features(quantized).numpy()
    f_ref = classifier.features(reference["video"]).numpy()
    acc = attribute_accuracy(classifier, quantized, reference["labels"])
    jumps = [boundary_jump(to_uint8_video(v)) for v in videos]
    return {"fvd_proxy": round(frechet_distance(f_ref, f_gen), 4),
            "attribute_accuracy": {k: round(v, 4) for k, v in acc.items()},
            "boundary_jump": round(float(np.mean(jumps)), 4)}


def evaluate_variants(config, classifier, variants: dict, count: int = 32, chunks: int = 3, seed: int = 0) -> dict:
    """``variants``: name -> (text_encoder, dit, decoder, schedule). Adds the reference set's own scores."""
    ref = reference_set(config.height, config.width, chunks, count)
    held = reference_set(config.height, config.width, chunks, count, seed=9002)
    results = {"reference (other real clips)": score(classifier, held["video"], ref)}
    results["reference (other real clips)"]["attribute_accuracy"] = {
        k: round(v, 4) for k, v in attribute_accuracy(classifier, ref["video"], ref["labels"]).items()}
    for name, (te, dit, dec, schedule) in variants.items():
        t0 = time.perf_counter()
        videos = generate_videos(config, te, dit, dec, ref["prompts"], chunks, schedule, seed)
        results[name] = score(classifier, videos, ref) | {"seconds": round(time.perf_counter() - t0, 1),
                                                          "steps": schedule.steps}
        log.info("%s: %s", name, results[name])
    return results
