"""Metrics: Frechet distance, PSNR/SSIM, boundary jump, attribute accuracy."""

import numpy as np
import torch

from s2dit_deploy.reference_training.data import SyntheticVideoDataset, collate
from s2dit_deploy.reference_training.metrics import (VideoClassifier, attribute_accuracy, boundary_jump,
                                                     frechet_distance, psnr, ssim)


def test_frechet_distance_identical_sets_is_zero_and_shift_is_seen():
    feats = np.random.default_rng(0).normal(size=(200, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-6
    # a mean shift of 1 in every dimension adds |mu1 - mu2|^2 = 8
    assert abs(frechet_distance(feats, feats + 1.0) - 8.0) < 1e-6


def test_classifier_features_on_identical_video_sets_give_fd_zero():
    ds = SyntheticVideoDataset(32, 64, chunks=1, seed=3)
    video = collate([ds[i] for i in range(12)])["video"]
    model = VideoClassifier().eval()
    with torch.no_grad():
        f = model.features(video).numpy()
    assert f.shape == (12, 128)
    assert abs(frechet_distance(f, f)) < 1e-4


def test_psnr_ssim():
    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert psnr(x, x) == float("inf")
    assert abs(ssim(x, x) - 1.0) < 1e-9
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    assert 15 < psnr(noisy, x) < 40 and ssim(noisy, x) < 0.99


def test_boundary_jump_hand_case():
    # 24 frames: +1 per frame within a chunk, +5 across the chunk boundary (frame 11 -> 12)
    values = np.concatenate([np.arange(12), 16 + np.arange(12)]).astype(np.uint8)
    video = np.broadcast_to(values[:, None, None, None], (24, 4, 4, 3))
    assert abs(boundary_jump(video) - 5.0) < 1e-6
    assert abs(boundary_jump(np.broadcast_to(np.arange(24, dtype=np.uint8)[:, None, None, None], (24, 2, 2, 3))) - 1.0) < 1e-6


def test_attribute_accuracy_counts_argmax_matches():
    class Fixed(torch.nn.Module):
        def forward(self, v):
            return {"shape": torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0]])}

    acc = attribute_accuracy(Fixed(), None, {"shape": torch.tensor([0, 1])})
    assert acc["shape"] == 0.5 and acc["mean"] == 0.5
