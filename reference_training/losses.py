"""The objective of each recipe, one short function each (read these first).

Conventions: rectified flow x_t = (1 - t) x0 + t eps with t in [0, 1]; models predict the velocity
v = eps - x0, so x0 = x_t - t v. ``t`` is per latent frame, shape (B, F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bt(t: torch.Tensor) -> torch.Tensor:
    """(B, F) per-frame times -> broadcastable over (B, C, F, H, W)."""
    return t[:, None, :, None, None]


def logit_normal_t(shape, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3's logit-normal timesteps: sigmoid(N(mean, std)), most mass at mid noise levels."""
    return torch.sigmoid(mean + std * torch.randn(shape, generator=generator))


def flow_matching_loss(velocity, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow regression of v = eps - x0 at x_t = (1-t) x0 + t eps.

    ``velocity(x_t, t)`` is the model. Frames with t == 0 are clean context (diffusion forcing): the
    model sees them but they carry no target, so they are left out of each sample's mean (a mean
    per sample, then over samples: equal-size shards of a batch average to the global value, as DDP needs).
    """
    xt = (1 - _bt(t)) * x0 + _bt(t) * noise
    err = (velocity(xt, t) - (noise - x0)).square().mean(dim=(1, 3, 4))  # (B, F)
    weight = (t > 0).float()
    return ((err * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)).mean()


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Distribution matching distillation (DMD2): move the generator's sample ``x`` along
    (real score - fake score), written with the two x0 predictions of the noised sample.

    The gradient w.r.t. ``x`` is (fake_x0 - real_x0) / normalizer, with DMD's per-sample
    normalizer mean|x - real_x0|; the loss value is 0.5 * mean(grad^2).
    """
    with torch.no_grad():
        normalizer = (x - real_x0).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-6)
        grad = (fake_x0 - real_x0) / normalizer
        target = x - grad
    return 0.5 * F.mse_loss(x, target)


def critic_loss(velocity, x_fake: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The fake-score model learns the generator's current distribution by flow matching on its
    (detached) samples; DMD's fake score is this model's denoiser."""
    return flow_matching_loss(velocity, x_fake.detach(), noise, t)


def decoder_l1_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (recon - target).abs().mean()


def perceptual_loss(feature_maps, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the feature maps of a frozen network (the in-repo video classifier's trunk)."""
    fr, ft = feature_maps(recon), feature_maps(target)
    return sum((a - b.detach()).abs().mean() for a, b in zip(fr, ft)) / len(fr)


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge GAN, generator side."""
    return -fake_logits.mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge GAN, discriminator side."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def self_distillation_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Eq. 10 (S2DiT supplement A): || y-hat - T(y) ||^2, the routed sandwich's output tokens against
    the all-self-attention teacher's on the same input tokens (mean over tokens and channels)."""
    return F.mse_loss(student_features, teacher_features.detach())


def velocity_kd_loss(student_v: torch.Tensor, teacher_v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Match a teacher's velocity on the noised frames (t > 0; clean context frames carry no target)."""
    err = (student_v - teacher_v.detach()).square().mean(dim=(1, 3, 4))
    weight = (t > 0).float()
    return ((err * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)).mean()


def feature_alignment_loss(teacher_features, student_features, aligners) -> torch.Tensor:
    """Eq. 5 (Taming-DiT): (1/N) sum_i sim(y_t_i, F_i(y_s_i)) over the N block groups, with F_i a
    learnable affine map from student to teacher width and sim the mean squared distance (0 when the
    aligned features are identical)."""
    terms = [F.mse_loss(f(ys), yt.detach()) for yt, ys, f in zip(teacher_features, student_features, aligners)]
    return torch.stack(terms).mean()


def pruning_loss(flow_loss: torch.Tensor, distill_loss: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """Eq. 6 (Taming-DiT): L_flow-matching + alpha * L_distill, alpha = 0.01 in the paper."""
    return flow_loss + alpha * distill_loss
