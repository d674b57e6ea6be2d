"""Each training objective on a case small enough to compute by hand."""

import torch

from s2dit_deploy.reference_training.losses import (critic_loss, decoder_l1_loss, dmd_loss, flow_matching_loss,
                                                    gan_discriminator_loss, gan_generator_loss, logit_normal_t,
                                                    perceptual_loss)


def test_flow_matching_loss_hand_case_and_clean_frames_excluded():
    x0 = torch.zeros(1, 1, 2, 1, 1)
    noise = torch.tensor([1.0, 3.0]).view(1, 1, 2, 1, 1)
    t = torch.tensor([[0.5, 0.0]])  # second frame is clean context: no target
    seen = {}

    def velocity(xt, tt):
        seen["xt"] = xt.clone()
        return torch.zeros_like(xt)

    loss = flow_matching_loss(velocity, x0, noise, t)
    # x_t = (1-t) x0 + t eps -> frame 0: 0.5, frame 1: 0 (clean); target eps - x0 = 1 on frame 0 only
    assert torch.allclose(seen["xt"].flatten(), torch.tensor([0.5, 0.0]))
    assert loss.item() == 1.0
    perfect = flow_matching_loss(lambda xt, tt: noise - x0, x0, noise, torch.tensor([[0.3, 0.7]]))
    assert perfect.item() == 0.0


def test_dmd_loss_value_and_gradient_direction():
    x = torch.ones(1, 1, 1, 2, 2, requires_grad=True)
    real_x0 = torch.zeros_like(x)
    fake_x0 = torch.full_like(x, 0.5)
    loss = dmd_loss(x, real_x0, fake_x0)
    # normalizer = mean|x - real| = 1, grad = (fake - real) / 1 = 0.5, loss = 0.5 * mean(0.5^2)
    assert abs(loss.item() - 0.125) < 1e-7
    loss.backward()
    # d/dx 0.5 * mean((x - (x - g))^2) = g / N: pushes x away from the fake and toward the real mode
    assert torch.allclose(x.grad, torch.full_like(x, 0.5 / 4))
    assert dmd_loss(x, real_x0, real_x0).item() == 0.0


def test_critic_loss_is_flow_matching_on_detached_samples():
    x = torch.randn(2, 3, 3, 2, 2, requires_grad=True)
    noise, t = torch.randn(2, 3, 3, 2, 2), torch.full((2, 3), 0.4)
    w = torch.nn.Parameter(torch.tensor(0.0))
    loss = critic_loss(lambda xt, tt: w * xt, x, noise, t)
    ref = ((noise - x.detach()) ** 2).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert x.grad is None and w.grad is not None


def test_decoder_and_gan_losses():
    a, b = torch.zeros(1, 3, 1, 2, 2), torch.full((1, 3, 1, 2, 2), 0.25)
    assert decoder_l1_loss(a, b).item() == 0.25
    maps = lambda v: [v, 2 * v]  # noqa: E731
    assert abs(perceptual_loss(maps, a, b).item() - (0.25 + 0.5) / 2) < 1e-7
    assert gan_discriminator_loss(torch.tensor([2.0]), torch.tensor([-0.5])).item() == 0.5
    assert gan_generator_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_logit_normal_timesteps_in_open_interval():
    t = logit_normal_t((1000,), torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.05
