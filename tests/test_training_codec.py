"""Latent codec: the Wan2.1 interface (16 ch, 4x8x8), causality, normalization, save/load."""

import pytest
import torch

from s2dit_deploy.reference_training.codec import (CodecConfig, VideoCodec, codec_loss, fit_latent_stats, load_codec,
                                                   load_wan_vae, save_codec)


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return VideoCodec(CodecConfig(channels=(8, 16))).eval()


def test_shapes_follow_the_wan_latent_interface(codec):
    video = torch.rand(2, 3, 24, 32, 64) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 16, 6, 4, 8)
    assert codec.decode(z).shape == video.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.encode(video[:, :, :10])


def test_encoder_and_decoder_are_causal_in_time(codec):
    video = torch.rand(1, 3, 24, 32, 64) * 2 - 1
    future_changed = video.clone()
    future_changed[:, :, 12:] = torch.rand_like(future_changed[:, :, 12:])
    with torch.no_grad():
        z, z2 = codec.encode(video), codec.encode(future_changed)
        assert torch.equal(z[:, :, :3], z2[:, :, :3])  # the first chunk ignores the future
        assert not torch.equal(z[:, :, 3:], z2[:, :, 3:])
        assert torch.allclose(codec.encode(video[:, :, :12]), z[:, :, :3], atol=1e-6)  # chunk encodes alone
        assert torch.allclose(codec.decode(z[:, :, :3]), codec.decode(z)[:, :, :12], atol=1e-6)


def test_latent_stats_normalize_to_unit_gaussian(codec, tmp_path):
    videos = [torch.rand(2, 3, 12, 32, 64) * 2 - 1 for _ in range(3)]
    fit_latent_stats(codec, videos)
    z = torch.cat([codec.encode(v) for v in videos])
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 0.05
    save_codec(tmp_path, codec)
    again = load_codec(tmp_path)
    assert torch.equal(again.encode(videos[0]), codec.encode(videos[0]))


def test_codec_loss_trains():
    torch.manual_seed(0)
    c = VideoCodec(CodecConfig(channels=(8, 16)))
    video = torch.rand(1, 3, 12, 32, 32) * 2 - 1
    opt = torch.optim.Adam(c.parameters(), lr=1e-2)
    first = None
    for i in range(15):
        loss, parts = codec_loss(c, video, generator=torch.Generator().manual_seed(i))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.95 * first and parts["kl"] >= 0


def test_wan_vae_loader_errors_clearly(tmp_path):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="diffusers"):
            load_wan_vae(tmp_path)
    else:
        with pytest.raises(FileNotFoundError):
            load_wan_vae(tmp_path / "missing")
