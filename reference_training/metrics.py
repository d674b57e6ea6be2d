"""Evaluation metrics: PSNR / SSIM, a small in-repo video classifier on the synthetic labels that
gives a Frechet distance (an FVD proxy, since I3D weights cannot be downloaded) and caption-attribute
accuracy, and the temporal jump at chunk boundaries of a streamed video.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ATTRIBUTES

log = logging.getLogger(__name__)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB for signals in [-1, 1] (range 2)."""
    mse = (x.clamp(-1, 1).double() - ref.double()).square().mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over frames (Gaussian 11x11, sigma 1.5, on the luma-free RGB channels), inputs (B,3,T,H,W)."""
    b, c, t, h, w = x.shape
    a = x.clamp(-1, 1).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).double()
    r = ref.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum())
    win = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()
    f = lambda z: F.conv2d(z, win, groups=c)  # noqa: E731
    mu_a, mu_r = f(a), f(r)
    saa, srr, sar = f(a * a) - mu_a**2, f(r * r) - mu_r**2, f(a * r) - mu_a * mu_r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_r + c1) * (2 * sar + c2)) / ((mu_a**2 + mu_r**2 + c1) * (saa + srr + c2))
    return float(s.mean())


class VideoClassifier(nn.Module):
    """3D conv net on (B, 3, T, H, W) in [-1, 1], one linear head per synthetic attribute.

    Inputs are resized to 48x80 and 12 frames are sampled uniformly, so clips of any length and
    resolution map to the same 128-d feature (used for the Frechet distance and as the perceptual
    feature network of decoder training).
    """

    def __init__(self, width: int = 32, motion: bool = False):
        super().__init__()
        w = width
        self.width, self.motion = width, motion
        self.trunk = nn.ModuleList([
            nn.Conv3d(6 if motion else 3, w, (3, 3, 3), stride=(1, 2, 2), padding=1),
            nn.Conv3d(w, 2 * w, (3, 3, 3), stride=(1, 2, 2), padding=1),
            nn.Conv3d(2 * w, 4 * w, (3, 3, 3), stride=(2, 2, 2), padding=1),
            nn.Conv3d(4 * w, 4 * w, (3, 3, 3), stride=(2, 2, 2), padding=1),
        ])
        self.norms = nn.ModuleList([nn.GroupNorm(8, c) for c in (w, 2 * w, 4 * w, 4 * w)])
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in ATTRIBUTES.items()})

    @staticmethod
    def prepare(video: torch.Tensor, frames: int = 12) -> torch.Tensor:
        b, c, t, h, w = video.shape
        idx = torch.linspace(0, t - 1, frames).round().long()
        v = video[:, :, idx].permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
        v = F.interpolate(v, size=(48, 80), mode="bilinear", align_corners=False, antialias=True)
        return v.reshape(b, frames, c, 48, 80).permute(0, 2, 1, 3, 4)

    def feature_maps(self, video: torch.Tensor, depth: int = 4) -> list[torch.Tensor]:
        x, maps = video, []
        if self.motion:  # frame differences as extra channels: direction and motion become easy to see
            x = torch.cat([x, torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:] - x[:, :, :-1]], dim=2)], dim=1)
        for conv, norm in list(zip(self.trunk, self.norms))[:depth]:
            x = F.silu(norm(conv(x)))
            maps.append(x)
        return maps

    def features(self, video: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(self.prepare(video))[-1].mean(dim=(2, 3, 4))

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(video)
        return {k: head(f) for k, head in self.heads.items()}


def classifier_loss(model: VideoClassifier, video: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(video)
    return sum(F.cross_entropy(logits[k], labels[k]) for k in logits) / len(logits)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets (N, D) and (M, D)."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@torch.no_grad()
def attribute_accuracy(model: VideoClassifier, video: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    logits = model(video)
    acc = {k: float((logits[k].argmax(-1) == labels[k]).float().mean()) for k in logits}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def boundary_jump(video: np.ndarray | torch.Tensor, chunk: int = 12) -> float:
    """Mean |frame difference| across chunk boundaries over the mean within chunks (1 = seamless).

    ``video`` is (T, H, W, 3) uint8 or (B, 3, T, H, W); a value well above 1 means visible seams.
    """
    v = torch.as_tensor(np.asarray(video) if isinstance(video, np.ndarray) else video).float()
    if v.dim() == 4:  # (T, H, W, 3)
        v = v.permute(3, 0, 1, 2)[None]
    d = (v[:, :, 1:] - v[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))  # (T-1,)
    idx = torch.arange(d.shape[0])
    at_boundary = (idx + 1) % chunk == 0
    if not at_boundary.any():
        raise ValueError(f"video of {v.shape[2]} frames has no chunk boundary (chunk={chunk})")
    return float(d[at_boundary].mean() / d[~at_boundary].mean().clamp_min(1e-8))


def save_classifier(folder, model: VideoClassifier) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    import json

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(folder) / "classifier.safetensors"))
    (Path(folder) / "classifier.json").write_text(json.dumps({"width": model.width, "motion": model.motion}) + "\n")


def load_classifier(folder) -> VideoClassifier:
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / "classifier.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train it with reference_training.classifier.train_classifier")
    import json

    meta = Path(folder) / "classifier.json"
    m = VideoClassifier(**(json.loads(meta.read_text()) if meta.is_file() else {}))
    m.load_state_dict(load_file(str(path)))
    return m.eval()
