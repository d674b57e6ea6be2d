"""Flow-matching pretraining: the loss falls on a fixed batch; resuming is bit-identical."""

import torch
from safetensors.torch import load_file

from s2dit_deploy.reference_training.configs import PretrainConfig, load_config
from s2dit_deploy.reference_training.losses import flow_matching_loss
from s2dit_deploy.reference_training.models import build_text_to_video, model_config, token_ids
from s2dit_deploy.reference_training.pretrain import chunk_timesteps, train_pretrain


def tiny_cfg(out, steps, **kw):
    base = dict(out=str(out), model="s2dit-tiny", codec="none", steps=steps, batch_size=2, warmup=2,
                checkpoint_every=2, log_every=1, **{"data.height": 32, "data.width": 64})
    base.update(kw)
    return load_config(PretrainConfig, None, **base)


def test_chunk_timesteps_are_per_chunk_and_last_chunk_is_noisy():
    cfg = load_config(PretrainConfig, None, clean_context_prob=0.5)
    t = chunk_timesteps(cfg, 64, 3, torch.Generator().manual_seed(0))
    assert t.shape == (64, 9)
    per_chunk = t.view(64, 3, 3)
    assert torch.equal(per_chunk, per_chunk[:, :, :1].expand(-1, -1, 3))
    assert (t[:, -3:] > 0).all() and (t[:, :6] == 0).any() and (t[:, :6] > 0).any()


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    mcfg = model_config("s2dit-tiny", 32, 64)
    net = build_text_to_video(mcfg, seed=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((2, 16, 6, 4, 8), generator=g), torch.randn((2, 16, 6, 4, 8), generator=g)
    t = torch.tensor([[0.3] * 3 + [0.7] * 3, [0.0] * 3 + [0.5] * 3])
    ids = token_ids(["a red circle moving left on a black background", "a blue square"], mcfg)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = flow_matching_loss(lambda xt, tt: net(xt, tt, ids), x0, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_continues_bit_identically(tmp_path):
    straight = train_pretrain(tiny_cfg(tmp_path / "a", 4), progress=False)
    first = train_pretrain(tiny_cfg(tmp_path / "b", 2), progress=False)
    resumed = train_pretrain(tiny_cfg(tmp_path / "b", 4), progress=False)
    assert first["start"] == 0 and resumed["start"] == 2
    assert resumed["losses"] == straight["losses"]
    a = load_file(str(tmp_path / "a" / "train_state" / "net.safetensors"))
    b = load_file(str(tmp_path / "b" / "train_state" / "net.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ema_a = load_file(str(tmp_path / "a" / "train_state" / "ema.safetensors"))
    ema_b = load_file(str(tmp_path / "b" / "train_state" / "ema.safetensors"))
    assert max((ema_a[k].float() - ema_b[k].float()).abs().max().item() for k in ema_a) <= 1e-6
    assert (tmp_path / "b" / "model" / "dit.safetensors").is_file()
