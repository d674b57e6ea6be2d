"""Op lists of the three S2DiT stages of a model config, traced on the meta device (no weights).

This is what ``bench MODEL --device D`` estimates from without compiling: the same stage wrappers
the compiler exports (``s2dit_deploy.stages``), at the config's deploy geometry, so a 1.8B model
costs seconds and no memory.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from s2dit_deploy.model_zoo.config import ModelConfig
from s2dit_deploy.model_zoo.registry import build_stage
from s2dit_deploy.stages import STAGE_NAMES, DecoderStage, DiTStepStage, TextEncoderStage, dit_step_inputs

from .op_trace import Op, trace_ops

@lru_cache(maxsize=16)  # configs are frozen: one trace per (config, stage), shared by every estimate
def stage_ops(config: ModelConfig, stage: str) -> tuple[Op, ...]:
    """The ops of one stage call (``dit_step``: one denoising step with a full cache window)."""
    if stage not in STAGE_NAMES:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_NAMES)}")
    with torch.device("meta"):
        if stage == "text_encoder":
            mod = TextEncoderStage(build_stage(config, "text_encoder")).eval()
            args: tuple = (torch.zeros(1, config.text_encoder.max_position_embeddings, dtype=torch.int32),)
        elif stage == "dit_step":
            dit = build_stage(config, "dit").eval()
            h, w = config.latent_hw
            cache = dit.init_cache(1, (h, w), config.stream)
            mod = DiTStepStage(dit, list(cache)).eval()
            ctx = torch.zeros(1, config.text_encoder.max_position_embeddings, config.dit.text_dim)
            x = torch.zeros(1, *config.chunk_latent_shape)
            args = ()
        else:
            dec = build_stage(config, "decoder").eval()
            h, w = config.latent_hw
            mod = DecoderStage(dec).eval()
            args = (torch.zeros(1, *config.chunk_latent_shape), *dec.init_cache(1, h, w))
    if stage == "dit_step":  # the RoPE tables are computed on the host (real tensors), then moved
        named = dit_step_inputs(config, x, 1.0, ctx, cache, 0)
        args = tuple(named.values())
    return tuple(trace_ops(mod, args))
