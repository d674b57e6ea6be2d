"""Model registry: the three S2DiT model cards and the loaders behind ``sd.load_model``.

A card is data (a ``ModelConfig`` plus provenance). Weights come from a checkpoint folder
(``model_zoo/checkpoints/<name>/`` when bundled, or a path the user gives). A model with no
bundled weights is built with a fixed seed and a logged warning, so every stage still runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_state, read_config
from .config import DecoderConfig, DiTConfig, ModelConfig, TextEncoderConfig

log = logging.getLogger(__name__)

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class ModelCard:
    config: ModelConfig
    description: str
    intended_use: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def bundled_weights(self) -> Path | None:
        folder = CHECKPOINT_ROOT / self.name
        return folder if (folder / "config.json").is_file() else None


CARDS: dict[str, ModelCard] = {
    card.name: card
    for card in (
        ModelCard(
            ModelConfig(
                name="s2dit-tiny",
                dit=DiTConfig(dim=32, num_heads=2, ffn_dim=64, layout="LSSL", text_dim=32),
                text_encoder=TextEncoderConfig(
                    hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, projection_dim=32,
                ),
                decoder=DecoderConfig(channels=(16, 16, 8, 4), temporal_up_at=(0, 1), groups=4),
                height=64, width=128,
            ),
            description="4 groups (LSSL), width 32: every code path at toy size.",
            intended_use="unit tests; a forward pass takes milliseconds",
        ),
        ModelCard(
            ModelConfig(
                name="s2dit-small",
                dit=DiTConfig(dim=192, num_heads=3, ffn_dim=768, layout="LLSSLL", text_dim=128),
                text_encoder=TextEncoderConfig(
                    hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=512, projection_dim=128,
                ),
                decoder=DecoderConfig(channels=(128, 64, 32, 16), groups=4),
                height=192, width=320,
            ),
            description="6 groups (LLSSLL), width 192, 320x192: the bundled default demo.",
            intended_use="default demo, quantization and compile experiments on a laptop CPU",
        ),
        ModelCard(
            ModelConfig(
                name="s2dit-mobile",
                dit=DiTConfig(dim=2048, num_heads=32, ffn_dim=7168, layout="LLLSSSSSSSSLLL", text_dim=768),
                text_encoder=TextEncoderConfig(),
                # Decoder widths sit at latent resolution where they are cheap; the full-resolution stage
                # stays narrow and time doubles late: 13.9M params, 538 GFLOPs per 512x288 chunk.
                decoder=DecoderConfig(),
                height=288, width=512,
            ),
            description=(
                "Paper scale: ~1.8B-parameter DiT (14 groups / 28 blocks, width 2048, 32 heads), "
                "CLIP ViT-L/14 text encoder, 512x288, chunk 3 latent frames, cache window 2."
            ),
            intended_use="compile, quantize and benchmark at the size that ships on phones (no trained weights)",
        ),
    )
}


def get_card(name: str) -> ModelCard:
    if name not in CARDS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(CARDS)} (see `s2dit-deploy models`)")
    return CARDS[name]


def resolve(name_or_path: str | os.PathLike, checkpoint: str | os.PathLike | None = None
            ) -> tuple[ModelConfig, Path | None]:
    """Config and weights folder for a registry name or a checkpoint folder path."""
    if checkpoint is not None:
        return read_config(checkpoint), Path(checkpoint)
    if str(name_or_path) not in CARDS and Path(name_or_path).is_dir():
        return read_config(name_or_path), Path(name_or_path)
    card = get_card(str(name_or_path))
    folder = card.bundled_weights
    if folder is None:
        return card.config, None
    return read_config(folder), folder


def build_stage(config: ModelConfig, stage: str) -> nn.Module:
    if stage == "dit":
        from .dit import S2DiT

        return S2DiT(config.dit)
    if stage == "text_encoder":
        from .text_encoder import TextEncoder

        return TextEncoder(config.text_encoder)
    if stage == "decoder":
        from .decoder import EfficientDecoder

        return EfficientDecoder(config.decoder)
    raise ValueError(f"unknown stage {stage!r}; stages are dit, text_encoder, decoder")


def load_stage(config: ModelConfig, folder: Path | None, stage: str, seed: int = 0) -> nn.Module:
    """Build a stage and fill it from ``folder``; without a folder use a fixed-seed init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_stage(config, stage)
    if folder is None:
        log.warning("%s: no trained %s weights are bundled; using a seed-%d random init", config.name, stage, seed)
    else:
        load_state(folder, stage, module)
    return module.eval()


def load_model(name: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The float S2DiT (DiT stage) of a registered model or a checkpoint folder."""
    config, folder = resolve(name, checkpoint)
    return load_stage(config, folder, "dit")


def list_cards() -> list[ModelCard]:
    return list(CARDS.values())


__all__ = ["CARDS", "CheckpointError", "ModelCard", "get_card", "list_cards", "load_model", "load_stage", "resolve"]
