"""Latent codec with the Wan2.1 interface (16 channels, 4x time, 8x8 space), causal in time.

Why: the seed trains S2DiT in Wan2.1's latent space. We cannot download Wan2.1, so a small
autoencoder trained on the synthetic data provides the same interface; ``load_wan_vae`` wraps a real
Wan2.1 VAE (diffusers ``AutoencoderKLWan``) when a user has one on disk.

Causality: pixel frames 4i..4i+3 are folded into channels of latent frame i, and every temporal
convolution is padded with zeros on the past only. A chunk therefore encodes (and decodes) the same
whether or not later frames exist. ``latent_mean``/``latent_std`` (per channel, buffers saved with
the weights) map the posterior mean to ~N(0, 1) latents: ``encode`` returns normalized latents and
``decode`` takes them, so the DiT and the efficient decoder never see raw scales.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model_zoo.config import LATENT_CHANNELS, VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecConfig:
    channels: tuple[int, ...] = (64, 96)  # widths at 1/4 and 1/8 spatial resolution
    latent_channels: int = LATENT_CHANNELS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class CausalConv(nn.Module):
    """Conv3d with (kt-1) zero frames of past padding and 'same' spatial padding."""

    def __init__(self, cin: int, cout: int, kernel=(2, 3, 3)):
        super().__init__()
        self.kt = kernel[0]
        self.conv = nn.Conv3d(cin, cout, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 0, 0, 0, self.kt - 1, 0)))


class Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = CausalConv(c, c), CausalConv(c, c)

    def forward(self, x):
        return x + self.b(F.silu(self.a(F.silu(x))))


def space_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // f, f, w // f, f).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * f * f, t, h // f, w // f)


def depth_to_space(x: torch.Tensor, f: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (f * f), f, f, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c // (f * f), t, h * f, w * f)


def time_to_depth(x: torch.Tensor, f: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t // f, f, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c * f, t // f, h, w)


def depth_to_time(x: torch.Tensor, f: int) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.reshape(b, c // f, f, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c // f, t * f, h, w)


class VideoCodec(nn.Module):
    """(B, 3, 4t, 8h, 8w) in [-1, 1] <-> normalized latents (B, 16, t, h, w)."""

    def __init__(self, cfg: CodecConfig = CodecConfig()):
        super().__init__()
        self.cfg = cfg
        c1, c2 = cfg.channels
        z = cfg.latent_channels
        tf = VAE_TEMPORAL_FACTOR
        # 4x4 patches folded into channels first: no full- or half-resolution convs (cheap on CPU).
        self.enc = nn.ModuleList([CausalConv(3 * tf * 16, c1), Res(c1), nn.Conv3d(c1 * 4, c2, 1), Res(c2), Res(c2)])
        self.enc_out = CausalConv(c2, 2 * z, (1, 3, 3))
        self.dec = nn.ModuleList([CausalConv(z, c2), Res(c2), Res(c2), nn.Conv3d(c2, c1 * 4, 1), Res(c1), Res(c1)])
        self.dec_out = CausalConv(c1, 3 * tf * 16, (1, 3, 3))
        self.register_buffer("latent_mean", torch.zeros(z))
        self.register_buffer("latent_std", torch.ones(z))

    def _check(self, video: torch.Tensor) -> None:
        t, h, w = video.shape[2:]
        if t % VAE_TEMPORAL_FACTOR or h % VAE_SPATIAL_FACTOR or w % VAE_SPATIAL_FACTOR:
            raise ValueError(f"video {tuple(video.shape)}: frames must be a multiple of 4 and H, W of 8")

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalized) posterior mean and log-variance."""
        self._check(video)
        x = space_to_depth(time_to_depth(video, VAE_TEMPORAL_FACTOR), 4)
        for i, layer in enumerate(self.enc):
            if i == 2:
                x = space_to_depth(F.silu(x), 2)
            x = layer(x)
        mean, logvar = self.enc_out(F.silu(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for i, layer in enumerate(self.dec):
            x = layer(F.silu(x) if i == 3 else x)
            if i == 3:
                x = depth_to_space(x, 2)
        x = self.dec_out(F.silu(x))
        return depth_to_time(depth_to_space(x, 4), VAE_TEMPORAL_FACTOR)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalized latents (the posterior mean), what the DiT trains on."""
        return self.normalize(self.posterior(video)[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(self.denormalize(z))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over elements."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


def codec_loss(codec: VideoCodec, video: torch.Tensor, kl_weight: float = 1e-4,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """VAE objective: L1 reconstruction of a posterior sample + a small KL keeping latents smooth."""
    mean, logvar = codec.posterior(video)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    recon = codec.decode_raw(mean + (0.5 * logvar).exp() * eps)
    rec, kl = (recon - video).abs().mean(), kl_divergence(mean, logvar)
    return rec + kl_weight * kl, {"l1": rec.item(), "kl": kl.item()}


@torch.no_grad()
def fit_latent_stats(codec: VideoCodec, videos) -> None:
    """Set per-channel mean/std of the posterior mean over an iterable of (B, 3, T, H, W) batches."""
    s = s2 = n = 0
    for v in videos:
        z = codec.posterior(v)[0].double()
        s = s + z.sum(dim=(0, 2, 3, 4))
        s2 = s2 + z.square().sum(dim=(0, 2, 3, 4))
        n += z.numel() // z.shape[1]
    mean = s / n
    codec.latent_mean.copy_(mean.float())
    codec.latent_std.copy_((s2 / n - mean.square()).clamp_min(1e-8).sqrt().float())


def save_codec(folder: str | Path, codec: VideoCodec) -> Path:
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, str(folder / "codec.safetensors"))
    (folder / "codec.json").write_text(json.dumps(codec.cfg.to_dict(), indent=2) + "\n")
    return folder


def load_codec(folder: str | Path) -> VideoCodec:
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "codec.safetensors").is_file():
        raise FileNotFoundError(f"{folder}/codec.safetensors is missing: train one with `s2dit-deploy train codec`")
    codec = VideoCodec(CodecConfig.from_dict(json.loads((folder / "codec.json").read_text())))
    codec.load_state_dict(load_file(str(folder / "codec.safetensors")))
    return codec.eval()


class WanVAECodec(nn.Module):
    """A real Wan2.1 VAE (diffusers ``AutoencoderKLWan``) behind the same encode/decode interface.

    Wan encodes 1 + 4k frames (the first frame alone); clips of 4k frames are encoded as given and
    the latents normalized with the VAE config's ``latents_mean`` / ``latents_std``.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.register_buffer("latent_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.tensor(cfg.latents_std, dtype=torch.float32))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video).latent_dist.mean
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        return self.vae.decode(z).sample


def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAECodec:
    """Load a Wan2.1 VAE from a local diffusers folder (``vae/`` of a Wan2.1 repo), never from the network."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as exc:
        raise RuntimeError(
            "loading a Wan2.1 VAE needs diffusers>=0.33 (`pip install diffusers`); the bundled "
            "synthetic codec (`s2dit-deploy train codec`) needs nothing extra"
        ) from exc
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Wan2.1 VAE folder {path} does not exist")
    sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
    vae = AutoencoderKLWan.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
    return WanVAECodec(vae.eval())
