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

from .checkpoint import (STAGE_FILES, CheckpointError, check_headers, load_state, read_config, recover_folder,
                         stored_dtype)
from ..errors import UsageError
from .compute_dtype import LOW_PRECISION, compute_in_fp32
from .config import ConfigError, DecoderConfig, DiTConfig, ModelConfig, TextEncoderConfig

log = logging.getLogger(__name__)

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"


# Seeded (weightless) stages are bounded by an estimate, not by headers; paper-scale DiT is ~1.8B.
MAX_STAGE_PARAMS = 8_000_000_000


@dataclass(frozen=True)
class ModelCard:
    """A registered model. ``config`` is what ``load_pipeline`` builds: when weights are bundled, their
    config.json is the truth (resolution included). ``deploy_height`` / ``deploy_width`` are the
    resolution the model is meant to be compiled and benchmarked at on phones (pass it as
    ``compile --resolution HxW``); None means the checkpoint's own resolution.
    """

    config: ModelConfig
    description: str
    intended_use: str
    deploy_height: int | None = None
    deploy_width: int | None = None
    # dtype the bundled weights run in when the caller asks for none; None: as stored. s2dit-small
    # ships fp16 files (half the repo size) but was trained, validated and always run in fp32.
    bundled_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        folder = self.bundled_weights
        if folder is not None:
            bundled = read_config(folder)
            if bundled != self.config:
                log.warning("%s: card config differs from its bundled %s; using the bundled one",
                            self.name, folder / "config.json")
                object.__setattr__(self, "config", bundled)
        self.config.with_resolution(*self.deploy_resolution)  # the deploy resolution must be valid too

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def deploy_resolution(self) -> tuple[int, int]:
        """(height, width) to compile at for deployment; defaults to the checkpoint's resolution."""
        return (self.deploy_height or self.config.height, self.deploy_width or self.config.width)

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
                height=32, width=64,  # what the bundled checkpoint was trained at and loads at
            ),
            description=("6 groups (LLSSLL), width 192: the bundled default demo, trained at 32x64 (HxW); "
                         "deploy resolution 192x320 (compile --resolution 192x320)."),
            intended_use="default demo, quantization and compile experiments on a laptop CPU",
            deploy_height=192, deploy_width=320, bundled_dtype=torch.float32,
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


class UnknownModelError(UsageError, KeyError):
    """A model name that is not registered (still a KeyError for older callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def get_card(name: str) -> ModelCard:
    if name not in CARDS:
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(CARDS)} (see `s2dit-deploy models`)")
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


def _precheck(config: ModelConfig, folder: Path | None, stage: str) -> nn.Module:
    """Fail before allocating: build on the meta device, then compare with the weights' headers
    (or, for seeded stages, bound the parameter count). Returns the meta module."""
    with torch.device("meta"):
        meta = build_stage(config, stage)
    if folder is not None:
        check_headers(folder, stage, meta.state_dict())
        return meta
    count = sum(p.numel() for p in meta.parameters())
    if count > MAX_STAGE_PARAMS:
        raise ConfigError(f"{config.name}: the {stage} stage would have {count:,} parameters "
                          f"(> MAX_STAGE_PARAMS = {MAX_STAGE_PARAMS:,}); check the config's sizes")
    return meta


def _clip_position_ids(module: nn.Module) -> torch.Tensor:
    return torch.arange(module.position_embedding.num_embeddings).expand((1, -1))


# Buffers that are not in a state dict (persistent=False) but computed in __init__: after a meta
# build they hold no values, so they are recomputed the way the module's constructor does.
# Checked against real builds in tests/test_lazy_load.py; a meta buffer without a rule is an error.
NON_PERSISTENT_BUFFERS = {("CLIPTextEmbeddings", "position_ids"): _clip_position_ids}


def _fill_meta_buffers(module: nn.Module, stage: str) -> None:
    for mod_name, mod in module.named_modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            rule = NON_PERSISTENT_BUFFERS.get((type(mod).__name__, name))
            if rule is None:
                raise RuntimeError(f"{stage}: buffer {mod_name}.{name} of {type(mod).__name__} is not in the "
                                   "checkpoint and has no rule in registry.NON_PERSISTENT_BUFFERS")
            setattr(mod, name, rule(mod).to(buf.dtype))
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{stage}: tensors still on the meta device after loading: {left[:5]}")


def default_dtype(folder: Path | None) -> torch.dtype | None:
    """The dtype a stage loads in when the caller asks for none: a card's ``bundled_dtype`` for its
    bundled folder, else None (as the checkpoint stores it)."""
    if folder is None:
        return None
    real = Path(folder).resolve()
    for card in CARDS.values():
        if card.bundled_weights is not None and card.bundled_weights.resolve() == real:
            return card.bundled_dtype
    return None


def load_dtypes(config: ModelConfig, folder: Path | None, dtype: torch.dtype | None = None
                ) -> dict[str, torch.dtype]:
    """The dtype each stage would load in (from the headers, nothing loaded): for the memory
    budget check before a compile."""
    out = {}
    for stage in ("dit", "text_encoder", "decoder"):
        if folder is None:
            out[stage] = dtype or torch.float32
            continue
        meta = _precheck(config, folder, stage)
        path = recover_folder(folder) / STAGE_FILES[stage]
        out[stage] = dtype or default_dtype(folder) or stored_dtype(path, meta.state_dict())
    return out


def load_stage(config: ModelConfig, folder: Path | None, stage: str, seed: int = 0,
               dtype: torch.dtype | None = None) -> nn.Module:
    """Build a stage and fill it from ``folder``; without a folder use a fixed-seed fp32 init.

    With weights, the module is built on the meta device and its tensors are the checkpoint's
    own, mapped from the safetensors file (one copy, in the stored dtype unless ``dtype`` or the
    card's ``bundled_dtype`` says otherwise). Shapes are checked against the headers (or a size
    bound) before any allocation.
    """
    meta = _precheck(config, folder, stage)
    if folder is None:
        log.warning("%s: no trained %s weights are bundled; using a seed-%d random init", config.name, stage, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build_stage(config, stage)
        return module.eval() if dtype is None else module.to(dtype).eval()
    loaded = load_state(folder, stage, meta, dtype or default_dtype(folder))
    _fill_meta_buffers(meta, stage)
    if loaded in LOW_PRECISION:  # stored in fp16/bf16, computed in fp32 on the host (compute_dtype.py)
        compute_in_fp32(meta)
    log.info("%s: loaded %s from %s as %s", config.name, stage, folder, loaded)
    return meta.eval()


def load_model(name: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The float S2DiT (DiT stage) of a registered model or a checkpoint folder."""
    config, folder = resolve(name, checkpoint)
    return load_stage(config, folder, "dit")


def list_cards() -> list[ModelCard]:
    return list(CARDS.values())


__all__ = ["CARDS", "CheckpointError", "ModelCard", "default_dtype", "get_card", "list_cards", "load_dtypes",
           "load_model", "load_stage", "resolve"]
