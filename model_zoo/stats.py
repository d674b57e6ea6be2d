"""Parameter and FLOP counts for model cards, computed on the meta device (no memory, no time).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convs and attention;
elementwise ops are not counted, as is usual for model cards). A "chunk step" is one DiT
evaluation of one chunk with a full cache window, the unit the seed's latency table uses.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, TextEncoderConfig
from .registry import build_stage

STAGES = ("text_encoder", "dit", "decoder")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_stage(config: ModelConfig, stage: str) -> torch.nn.Module:
    with torch.device("meta"):
        return build_stage(config, stage)


def text_encoder_params(config: TextEncoderConfig) -> int:
    """Parameters of the CLIP text stage, by formula: building it would import transformers
    (seconds) just to count. tests/test_startup.py checks it against the built module."""
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h  # attn, mlp, 2 LNs
    return (config.vocab_size + config.max_position_embeddings) * h + layers * per_layer + 2 * h


def stage_params(config: ModelConfig) -> dict[str, int]:
    counts = {stage: count_params(_meta_stage(config, stage)) for stage in STAGES if stage != "text_encoder"}
    return {"text_encoder": text_encoder_params(config.text_encoder), **counts}


def dit_step_flops(config: ModelConfig) -> int:
    """FLOPs of one DiT chunk step at the config's resolution with a full cache window."""
    dit = _meta_stage(config, "dit")
    h, w = config.latent_hw
    with torch.device("meta"):
        cache = dit.init_cache(1, (h, w), config.stream)
        cache["window_valid"] = torch.ones(config.stream.window_chunks)
        x = torch.zeros(1, *config.chunk_latent_shape)
        ctx = torch.zeros(1, config.text_encoder.max_position_embeddings, config.dit.text_dim)
    with FlopCounterMode(display=False) as counter:
        dit.step(x, torch.zeros(1, device="meta"), ctx, cache, 0)
    return counter.get_total_flops()


def tokens_per_chunk(config: ModelConfig) -> int:
    h, w = config.latent_hw
    t, gh, gw = config.dit.token_grid(config.stream.chunk_frames, h, w)
    return t * gh * gw


def with_full_attention(config: ModelConfig) -> ModelConfig:
    """The same model with dense softmax attention at full resolution in every group."""
    dit = config.dit.with_layout("F" * config.dit.num_groups)
    return dataclasses.replace(config, name=config.name + "-full-attention", dit=dit)
