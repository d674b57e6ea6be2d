"""Building and exporting the trainable stages (DiT, text encoder, codec) for the recipes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from ..model_zoo.checkpoint import read_config
from ..model_zoo.config import ModelConfig
from ..model_zoo.registry import build_stage, get_card
from ..model_zoo.tokenizer import tokenize
from .codec import CodecConfig, VideoCodec, load_codec

log = logging.getLogger(__name__)


def model_config(name_or_folder: str, height: int, width: int) -> ModelConfig:
    """The card (or checkpoint folder) architecture at the training resolution."""
    cfg = read_config(name_or_folder) if Path(name_or_folder).is_dir() else get_card(name_or_folder).config
    cfg = cfg.with_resolution(height, width)
    cfg.dit.token_grid(cfg.stream.chunk_frames, *cfg.latent_hw)  # validates the resolution
    return cfg


class TextToVideo(nn.Module):
    """Text encoder + DiT as one module, so DDP syncs both and the loss sees one callable."""

    def __init__(self, dit: nn.Module, text_encoder: nn.Module, chunk_frames: int = 3, window: int = 2):
        super().__init__()
        self.dit, self.text_encoder = dit, text_encoder
        self.chunk_frames, self.window = chunk_frames, window

    def forward(self, xt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.dit(xt, t, self.text_encoder(ids), self.chunk_frames, self.window)


def build_text_to_video(cfg: ModelConfig, seed: int, chunk_frames: int = 3, window: int = 2) -> TextToVideo:
    torch.manual_seed(seed)
    return TextToVideo(build_stage(cfg, "dit"), build_stage(cfg, "text_encoder"), chunk_frames, window)


def get_codec(folder: str | None, seed: int = 0) -> VideoCodec:
    """The trained codec of a run folder; ``None``/"none" gives a seeded untrained one (tests)."""
    if folder is None or str(folder).lower() in ("", "none"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return VideoCodec(CodecConfig(channels=(8, 16))).eval()
    return load_codec(folder)


def token_ids(captions: list[str], cfg: ModelConfig) -> torch.Tensor:
    return tokenize(captions, max_length=cfg.text_encoder.max_position_embeddings)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_resolution_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg.stream) | {"height": cfg.height, "width": cfg.width}
