"""CLIP text transformer stage: prompt ids ``(B, 77)`` -> conditioning ``last_hidden_state``.

Why this shape:

* The network is the real ``transformers.CLIPTextModel`` built from a ``CLIPTextConfig`` (random
  init). Weights come later from the project's checkpoints via ``load_state_dict``; nothing is ever
  fetched with ``from_pretrained``.
* The DiT cross-attends to the per-token states, so ``forward`` returns ``last_hidden_state`` (after
  the final LayerNorm). The pooled output and the text projection (``projection_dim``) are not used
  by the stage and no projection weights are built.
* Attention defaults to ``"eager"`` (matmul + additive causal mask + softmax): it goes through
  ``torch.export`` as plain aten ops that Core ML, QNN and XNNPACK all lower, whereas ``"sdpa"``
  exports as one ``scaled_dot_product_attention`` op that some backends must decompose. Both are
  numerically equivalent; pass ``attn_implementation="sdpa"`` for faster eager CPU/GPU inference.
* No padding mask is passed (as in CLIP and Stable Diffusion); CLIP's causal mask already keeps a
  token's state independent of anything after it, so padding never leaks into real positions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import TextEncoderConfig
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, tokenize

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

logger = logging.getLogger(__name__)

# Sizes live in the model cards (registry.py); TextEncoderConfig() defaults to CLIP ViT-L/14.


def clip_text_config(config: TextEncoderConfig, attn_implementation: str = "eager") -> CLIPTextConfig:
    """``CLIPTextConfig`` for a project config, with CLIP's special ids and quick-GELU defaults."""
    from transformers import CLIPTextConfig  # lazy: transformers takes seconds to import

    return CLIPTextConfig(
        **config.to_dict(),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attn_implementation=attn_implementation,
    )


class TextEncoder(nn.Module):
    """CLIP text transformer; ``state_dict`` keys are ``model.<CLIPTextModel keys>``."""

    def __init__(self, config: TextEncoderConfig, attn_implementation: str = "eager") -> None:
        from transformers import CLIPTextModel

        super().__init__()
        self.config = config
        self.model = CLIPTextModel(clip_text_config(config, attn_implementation))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, max_position_embeddings)`` token ids -> ``(B, L, hidden_size)`` hidden states."""
        return self.model(input_ids=input_ids).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Tokenize prompts (CLIP BPE, padded to the context length) and run the encoder."""
        ids = tokenize(prompts, max_length=self.config.max_position_embeddings)
        device = self.model.embeddings.token_embedding.weight.device
        return self.forward(ids.to(device))
