"""Rectified-flow sampler: exact velocities give exact samples; schedules are fixed and ordered."""

import pytest
import torch

from s2dit_deploy.model_zoo.sampler import FewStepSchedule, add_noise, sample


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("rule", ["euler", "renoise"])
def test_exact_velocity_recovers_the_clean_sample(steps, rule):
    x0 = torch.randn(2, 16, 3, 4, 4)
    eps = torch.randn_like(x0)
    # along the straight path x_t = (1-t) x0 + t eps the velocity is eps - x0 for every t;
    # for renoise the oracle recovers x0 from any x_t: v = (x_t - x0) / t
    oracle = lambda x, t: (x - x0) / t  # noqa: E731
    schedule = FewStepSchedule(steps=steps, rule=rule)
    out = sample(oracle, add_noise(x0, eps, 1.0), schedule, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_schedules_start_at_pure_noise_and_decrease():
    for steps in (1, 2, 4):
        ts = FewStepSchedule(steps=steps).timesteps
        assert len(ts) == steps and ts[0] == 1.0
        assert all(a > b > 0 for a, b in zip(ts, ts[1:]))


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError):
        FewStepSchedule(steps=0)
    with pytest.raises(ValueError, match="unknown sampler rule"):
        FewStepSchedule(rule="ddim")
