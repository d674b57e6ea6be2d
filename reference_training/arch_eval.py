"""The two numbers every architecture recipe reports: held-out flow-matching loss and the FVD proxy.

- Eval loss: flow matching on a held-out latent set (other prompts, other noise) at a fixed grid of
  t values with seeded noise, block-causal with the deployment window, so two models are compared
  on the same draws.
- FVD proxy (optional, needs a trained metrics classifier): 4-step streaming samples of held-out
  captions, decoded with the checkpoint's decoder and scored as ``evaluate.score`` scores the
  bundled model (model card table).
"""

from __future__ import annotations

import logging

import torch

from ..model_zoo.sampler import FewStepSchedule
from .losses import flow_matching_loss

log = logging.getLogger(__name__)
EVAL_T = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def heldout_loss(dit, data: dict[str, torch.Tensor], chunk_frames: int, window: int, seed: int = 1234,
                 batch: int = 16) -> float:
    """Mean flow-matching loss over the set x the fixed t grid (one t for all chunks of a clip)."""
    dit.eval()
    x0_all, ctx_all = data["x0"], data["context"]
    total, count = 0.0, 0
    for i in range(0, x0_all.shape[0], batch):
        x0, ctx = x0_all[i : i + batch], ctx_all[i : i + batch]
        for j, tv in enumerate(EVAL_T):
            g = torch.Generator().manual_seed(seed * 101 + i * 7 + j)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.full((x0.shape[0], x0.shape[2]), tv)
            loss = flow_matching_loss(lambda xt, tt: dit(xt, tt, ctx, chunk_frames, window), x0, noise, t)
            total += float(loss) * x0.shape[0]
            count += x0.shape[0]
    return total / count


def fvd_proxy(config, text_encoder, dit, decoder, classifier_folder: str, count: int = 32, chunks: int = 2) -> dict:
    """FVD proxy, attribute accuracy and boundary jump of 4-step streamed samples (``evaluate.score``)."""
    from .evaluate import generate_videos, reference_set, score
    from .metrics import load_classifier

    classifier = load_classifier(classifier_folder)
    ref = reference_set(config.height, config.width, chunks, count)
    videos = generate_videos(config, text_encoder, dit.eval(), decoder, ref["prompts"], chunks, FewStepSchedule(4))
    return score(classifier, videos, ref)
