"""CLIP text stage: shapes, preset sizes (on meta), torch.export parity, causal independence."""

from __future__ import annotations

import pytest
import torch

from s2dit_deploy.model_zoo.config import TextEncoderConfig
from s2dit_deploy.model_zoo.registry import get_card
from s2dit_deploy.model_zoo.text_encoder import TextEncoder
from s2dit_deploy.model_zoo.tokenizer import EOS_ID, tokenize

TEXT_ENCODER_TINY = get_card("s2dit-tiny").config.text_encoder
TEXT_ENCODER_SMALL = get_card("s2dit-small").config.text_encoder
TEXT_ENCODER_CLIP_L = get_card("s2dit-mobile").config.text_encoder


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TEXT_ENCODER_TINY).eval()


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_shapes_and_encode(tiny):
    ids = torch.randint(0, 49408, (3, 77))
    out = tiny(ids)
    assert out.shape == (3, 77, 32) and out.dtype == torch.float32
    enc = tiny.encode(["a photo of a cat", "a dog"])
    assert enc.shape == (2, 77, 32) and not enc.requires_grad
    torch.testing.assert_close(enc, tiny(tokenize(["a photo of a cat", "a dog"])))


def test_state_dict_keys_are_stable(tiny):
    keys = list(tiny.state_dict())
    assert keys[0] == "model.embeddings.token_embedding.weight"
    assert "model.final_layer_norm.weight" in keys
    assert all(k.startswith("model.") for k in keys)
    fresh = TextEncoder(TEXT_ENCODER_TINY)
    fresh.load_state_dict(tiny.state_dict())  # strict round trip


@pytest.mark.parametrize(
    "config, expected",
    [(TEXT_ENCODER_CLIP_L, 123_060_480), (TEXT_ENCODER_SMALL, 6_929_152), (TEXT_ENCODER_TINY, 1_600_672)],
)
def test_preset_param_counts_on_meta(config, expected):
    with torch.device("meta"):
        model = TextEncoder(config)
    assert next(model.parameters()).is_meta
    assert _n_params(model) == expected


def test_clip_l_matches_openai_text_tower_shape():
    with torch.device("meta"):
        model = TextEncoder(TEXT_ENCODER_CLIP_L)
    cfg = model.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert cfg.hidden_act == "quick_gelu" and cfg.eos_token_id == EOS_ID
    assert model.model.embeddings.token_embedding.weight.shape == (49408, 768)
    assert model.model.embeddings.position_embedding.weight.shape == (77, 768)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_torch_export_matches_eager(attn):
    torch.manual_seed(0)
    model = TextEncoder(TEXT_ENCODER_TINY, attn_implementation=attn).eval()
    ids = tokenize(["a corgi surfing a wave", "timelapse of clouds"])
    exported = torch.export.export(model, (ids,))
    other = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids), model(ids))
        torch.testing.assert_close(exported.module()(other), model(other))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    if attn == "eager":  # the default: plain matmul/softmax, no fused attention op for backends
        assert not any("scaled_dot_product" in op for op in ops)


def test_eager_and_sdpa_agree(tiny):
    sdpa = TextEncoder(TEXT_ENCODER_TINY, attn_implementation="sdpa")
    sdpa.load_state_dict(tiny.state_dict())
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids), tiny(ids))


def test_causal_mask_real_positions_ignore_later_tokens(tiny):
    ids = tokenize("a photo of a cat")  # bos + 5 tokens + eos at index 6, then padding
    changed = ids.clone()
    changed[0, 7:] = torch.randint(0, 49406, (70,))  # different padding
    changed2 = ids.clone()
    changed2[0, 4] = 1125  # change a token mid-prompt
    with torch.no_grad():
        base, padded, mid = tiny(ids), tiny(changed), tiny(changed2)
    torch.testing.assert_close(padded[:, :7], base[:, :7], rtol=0, atol=0)
    assert not torch.allclose(padded[:, 7:], base[:, 7:])
    torch.testing.assert_close(mid[:, :4], base[:, :4], rtol=0, atol=0)
    assert not torch.allclose(mid[:, 4:], base[:, 4:])


def test_config_fields_pass_through():
    cfg = TextEncoderConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                            intermediate_size=96, max_position_embeddings=16, projection_dim=48)
    model = TextEncoder(cfg)
    assert model.encode("hello world").shape == (1, 16, 48)
