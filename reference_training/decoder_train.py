"""Efficient-decoder training (``s2dit-deploy train decoder``), seed D.1 / Table A2.

The encoder of the codec is frozen; ``model_zoo.decoder.EfficientDecoder`` (narrow causal 3D convs,
per-frame GroupNorm, Hardswish) learns to map its *normalized* latents -- exactly what the DiT
emits and what the pipeline feeds the decoder -- back to pixels in [-1, 1], with L1 + a perceptual
term (feature maps of the in-repo video classifier) + an optional hinge GAN term. Small Gaussian
noise on the latents makes it tolerant of the DiT's imperfect samples.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model_zoo.registry import build_stage
from .codec_train import make_dataset
from .common import (append_jsonl, init_distributed, load_training_state, lr_at, mean_across_ranks,
                     save_training_state, step_generator)
from .configs import DecoderTrainConfig, write_config
from .data import SyntheticVideoDataset, global_batch
from .distill import allreduce_grads
from .losses import decoder_l1_loss, gan_discriminator_loss, gan_generator_loss, perceptual_loss
from .metrics import VideoClassifier, load_classifier, psnr, ssim
from .models import get_codec, model_config

log = logging.getLogger(__name__)


class PatchDiscriminator(nn.Module):
    """A small 3D conv patch discriminator (hinge loss) for the optional GAN term."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, width, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)), nn.LeakyReLU(0.2),
            nn.Conv3d(width, 2 * width, (3, 4, 4), stride=(2, 2, 2), padding=(1, 1, 1)), nn.LeakyReLU(0.2),
            nn.Conv3d(2 * width, 1, 3, padding=1),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def train_decoder(cfg: DecoderTrainConfig, progress: bool = True) -> dict:
    rank, world, device = init_distributed()
    out = Path(cfg.out)
    if rank == 0:
        write_config(out, cfg)
    mcfg = model_config(cfg.model, cfg.data.height, cfg.data.width)
    torch.manual_seed(cfg.seed)
    decoder = build_stage(mcfg, "decoder").train()
    codec = get_codec(cfg.codec).requires_grad_(False)
    features = (load_classifier(cfg.classifier) if cfg.classifier and str(cfg.classifier).lower() != "none"
                else VideoClassifier().eval()).requires_grad_(False)
    disc = PatchDiscriminator() if cfg.gan_weight > 0 else None
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.99)) if disc else None
    modules = {"decoder": decoder} | ({"disc": disc} if disc else {})
    optims = {"decoder": opt} | ({"disc": opt_d} if disc else {})
    start, history = 0, []
    state_dir = out / "train_state"
    if cfg.resume and (state_dir / "state.json").is_file():
        scalars = load_training_state(state_dir, modules, optims)
        start, history = scalars["step"], scalars["history"]
    data = make_dataset(cfg.data)
    feature_maps = lambda v: features.feature_maps(VideoClassifier.prepare(v), depth=2)  # noqa: E731
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="decoder", disable=not progress or rank != 0, initial=start, total=cfg.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        video = global_batch(data, step, cfg.batch_size, rank, world)["video"].to(device)
        g = step_generator(cfg.seed, step, rank)
        with torch.no_grad():
            z = codec.encode(video)
            z = z + cfg.latent_noise * torch.randn(z.shape, generator=g)
        recon = decoder.decode_full(z)
        l1 = decoder_l1_loss(recon, video)
        perc = perceptual_loss(feature_maps, recon, video)
        loss = l1 + cfg.perceptual_weight * perc
        if disc is not None:
            loss = loss + cfg.gan_weight * gan_generator_loss(disc(recon))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(decoder)
        opt.step()
        if disc is not None:
            loss_d = gan_discriminator_loss(disc(video), disc(recon.detach()))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            allreduce_grads(disc)
            opt_d.step()
        value = mean_across_ranks(loss)
        history.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if rank == 0 and step % cfg.log_every == 0:
            log.info("decoder step %d loss %.5f l1 %.5f perceptual %.5f", step, value, l1.item(), perc.item())
            append_jsonl(out / "log.jsonl", {"step": step, "loss": value, "l1": l1.item(), "perceptual": perc.item(),
                                             "time": time.perf_counter() - t0})
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_training_state(state_dir, modules, optims, {"step": step + 1, "history": history})
            save_decoder(out, decoder)
    result = {"out": str(out), "steps": cfg.steps, "seconds": time.perf_counter() - t0,
              "final_loss": history[-1] if history else None}
    if rank == 0:
        result["comparison"] = compare_decoders(codec, decoder.eval(), cfg.data.height, cfg.data.width)
    return result


def save_decoder(folder: Path, decoder: nn.Module) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(folder / "decoder.safetensors"))


@torch.no_grad()
def compare_decoders(codec, decoder, height: int, width: int, clips: int = 16, seed: int = 4242) -> dict:
    """Seed Table A2: PSNR / SSIM vs ground truth and params, efficient decoder vs the codec's decoder."""
    data = SyntheticVideoDataset(height, width, chunks=1, seed=seed, caption_drop=0.0)
    video = global_batch(data, 0, clips)["video"]
    z = codec.encode(video)
    rows = {}
    for name, fn, params in (
        ("codec_decoder", codec.decode, sum(p.numel() for n, p in codec.named_parameters() if n.startswith("dec"))),
        ("efficient_decoder", decoder.decode_full, sum(p.numel() for p in decoder.parameters())),
    ):
        t0 = time.perf_counter()
        recon = fn(z)
        rows[name] = {"psnr": round(psnr(recon, video), 3), "ssim": round(ssim(recon, video), 4),
                      "params": int(params), "seconds_per_clip": round((time.perf_counter() - t0) / clips, 4)}
    return rows
