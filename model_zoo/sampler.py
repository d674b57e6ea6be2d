"""Rectified-flow sampling: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0.

Few-step schedules are fixed lists of t values (1.0 first). Two update rules:
- ``euler``: integrate the ODE, x_{t'} = x_t + (t' - t) v.
- ``renoise``: predict x0 = x_t - t v, then re-noise to t' with fresh noise; this is how DMD /
  Self-Forcing few-step generators are sampled, and what the streaming pipeline uses by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]

# Step counts a distilled model's config may name: the nested 1/2/4-step schedules (their
# timesteps are subsets of each other), so one set of weights serves each. ModelConfig.steps is
# checked against this; FewStepSchedule itself still accepts any count for teachers / experiments.
SUPPORTED_STEPS = (1, 2, 4)


def shifted(t: float, shift: float) -> float:
    """Timestep shift of SD3/Wan: pushes steps toward high noise for larger ``shift``."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class FewStepSchedule:
    """Fixed 1/2/4-step schedule: uniform t in (0, 1] warped by ``shift``, ending at 0."""

    steps: int = 4
    shift: float = 5.0
    rule: str = "renoise"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (1, 2 or 4 for distilled models), got {self.steps}")
        if self.rule not in ("euler", "renoise"):
            raise ValueError(f"unknown sampler rule {self.rule!r}; use 'euler' or 'renoise'")

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The t value of each model evaluation, e.g. 4 steps / shift 5 -> (1.0, 0.94, 0.83, 0.63)."""
        return tuple(shifted(1.0 - i / self.steps, self.shift) for i in range(self.steps))


def noise_like(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return (1 - t) * x0 + t * eps


def sample(velocity: VelocityFn, noise: torch.Tensor, schedule: FewStepSchedule,
           generator: torch.Generator | None = None,
           renoise: Callable[[int, tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """Run the schedule from pure noise (t = 1) down to a clean x0.

    The re-noise before step ``j`` (renoise rule) comes from ``renoise(j, shape)`` when given (the
    streaming pipeline's portable draws), else from ``torch.randn`` on ``generator``."""
    ts = schedule.timesteps
    x = noise
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else 0.0
        v = velocity(x, t)
        if schedule.rule == "euler":
            x = x + (t_next - t) * v
        else:
            x0 = x - t * v
            if t_next == 0.0:
                x = x0
            else:
                eps = (renoise(i + 1, tuple(x.shape)).to(x.dtype) if renoise is not None
                       else torch.randn(x.shape, generator=generator, dtype=x.dtype))
                x = add_noise(x0, eps, t_next)
    return x
