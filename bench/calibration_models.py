"""Calibration architectures for the device-latency cost model.

Each entry rebuilds, with random weights, a network whose on-device latency is
published (see ``bench/calibration/published_latencies.json``), together with
the exact example inputs the published benchmark used.  The cost model traces
these modules on the meta device and fits its efficiency factors to the
published numbers.  Only the architecture matters: weights are random, nothing
is ever downloaded (every model is built from a config written in this file).

Every ``build`` and ``inputs`` callable works inside ``with torch.device("meta"):``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .calibration_nets import _AUDIO_LEN, _DEC_LEN, _WHISPER, TamingDiT, WhisperDecoderStep, WhisperEncoderKV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationModel:
    key: str
    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    kwargs: Callable[[], dict] = field(default=lambda: {})


MODELS: dict[str, CalibrationModel] = {}


def _reg(key: str, description: str, build, inputs, kwargs=None) -> None:
    MODELS[key] = CalibrationModel(key, description, build, inputs, kwargs or (lambda: {}))


def get(key: str) -> CalibrationModel:
    """Return the calibration model registered under ``key``."""
    try:
        model = MODELS[key]
    except KeyError:
        raise KeyError(f"unknown calibration model {key!r}; known: {sorted(MODELS)}") from None
    log.debug("calibration model %s: %s", key, model.description)
    return model


def _eval(m: nn.Module) -> nn.Module:
    return m.eval()


def _image(size: int) -> Callable[[], tuple]:
    return lambda: (torch.zeros(1, 3, size, size),)


class _LogitsOnly(nn.Module):
    """Call a Hugging Face model with ``return_dict=False`` and keep output 0."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args, return_dict=False)[0]


# --------------------------------------------------------------------------- vision
def _tf():
    import transformers  # deferred: heavy import

    return transformers


def _vit_b16():
    t = _tf()  # torchvision vit_b_16 == ViT-B/16, 224, CLS head
    cfg = t.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000)
    return _eval(_LogitsOnly(t.ViTForImageClassification(cfg)))


def _beit_b16():
    t = _tf()
    cfg = t.BeitConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000,
                       use_relative_position_bias=True, use_absolute_position_embeddings=False,
                       use_mean_pooling=True, layer_scale_init_value=0.1)
    return _eval(_LogitsOnly(t.BeitForImageClassification(cfg)))


def _mobilevit_s():
    t = _tf()  # MobileViTConfig defaults are apple/mobilevit-small
    cfg = t.MobileViTConfig(image_size=256, num_labels=1000)
    return _eval(_LogitsOnly(t.MobileViTForImageClassification(cfg)))


def _convnext(depths, dims):
    def build():
        t = _tf()
        cfg = t.ConvNextConfig(depths=depths, hidden_sizes=dims, num_labels=1000)
        return _eval(_LogitsOnly(t.ConvNextForImageClassification(cfg)))
    return build


def _effnet(width, depth, hidden_dim, dropout):
    def build():
        t = _tf()
        cfg = t.EfficientNetConfig(width_coefficient=width, depth_coefficient=depth,
                                   hidden_dim=hidden_dim, dropout_rate=dropout, num_labels=1000)
        return _eval(_LogitsOnly(t.EfficientNetForImageClassification(cfg)))
    return build


def _resnet(layer_type, depths, widths):
    def build():
        t = _tf()  # downsample_in_bottleneck=False: stride in the 3x3 (torchvision v1.5)
        cfg = t.ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=widths,
                             embedding_size=64, downsample_in_bottleneck=False, num_labels=1000)
        return _eval(_LogitsOnly(t.ResNetForImageClassification(cfg)))
    return build


def _mobilenet_v2():
    t = _tf()
    cfg = t.MobileNetV2Config(depth_multiplier=1.0, image_size=224, tf_padding=False,
                              num_labels=1000)
    return _eval(_LogitsOnly(t.MobileNetV2ForImageClassification(cfg)))


class _ClipScores(nn.Module):
    """OpenAI CLIP: image and text features, cosine similarity * logit scale."""

    def __init__(self):
        super().__init__()
        t = _tf()
        text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                    num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                    hidden_act="quick_gelu")
        vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                      num_hidden_layers=12, image_size=224, patch_size=16, hidden_act="quick_gelu")
        self.clip = t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision,
                                             projection_dim=512))

    def forward(self, image, text):
        return self.clip(input_ids=text, pixel_values=image, return_dict=False)[0]


def _depth_anything_small():
    t = _tf()  # depth-anything/Depth-Anything-V2-Small-hf (V1 small: same architecture)
    dino = t.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                          patch_size=14, image_size=518, out_indices=[3, 6, 9, 12],
                          apply_layernorm=True, reshape_hidden_states=False)
    cfg = t.DepthAnythingConfig(backbone_config=dino, neck_hidden_sizes=[48, 96, 192, 384],
                                fusion_hidden_size=64, reassemble_hidden_size=384,
                                reassemble_factors=[4, 2, 1, 0.5], head_hidden_size=32,
                                patch_size=14, depth_estimation_type="relative")
    return _eval(_DepthNormalized(t.DepthAnythingForDepthEstimation(cfg)))


class _DepthNormalized(nn.Module):
    """coreml-examples Depth Anything export wrapper: ImageNet-normalize a [0, 255] image,
    predict relative depth, divide by its max (tutorials/depth-anything-coreml-guide.ipynb)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, image):
        depth = self.model((image - self.mean) / self.std, return_dict=False)[0]
        return (depth / depth.max()).unsqueeze(0)


class _DetrSemantic(nn.Module):
    """facebook/detr-resnet-50-panoptic (DetrForSegmentation, 250 classes, 100 queries) with
    per-query masks folded into a per-pixel class map, as apple/coreml-detr-semantic-segmentation.
    The fold (softmax-class x sigmoid-mask, argmax) is an assumption: the export script is not public."""

    def __init__(self):
        super().__init__()
        t = _tf()
        rn = t.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                            hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                            downsample_in_bottleneck=False,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
        cfg = t.DetrConfig(backbone_config=rn, num_queries=100, d_model=256, encoder_layers=6,
                           decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                           encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_labels=250,
                           dilation=False, attn_implementation="eager")
        self.detr = t.DetrForSegmentation(cfg)

    def forward(self, image):
        from transformers.models.detr import modeling_detr as md

        keep = md.create_bidirectional_mask  # all-ones pixel mask: no masking (and no .all() on meta)
        md.create_bidirectional_mask = lambda **kw: None
        try:
            out = self.detr(pixel_values=image, return_dict=True)
        finally:
            md.create_bidirectional_mask = keep
        probs = out.logits.softmax(-1)[..., :-1]                    # (1, 100, 250), drop no-object
        masks = out.pred_masks.sigmoid()                           # (1, 100, H/4, W/4)
        scores = torch.einsum("bqc,bqhw->bchw", probs, masks)
        scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear")
        return scores.argmax(dim=1)


# --------------------------------------------------------------------------- text
def _bert_inputs():
    return (torch.zeros(1, 384, dtype=torch.int32), torch.ones(1, 384),
            torch.zeros(1, dtype=torch.int32))


def _additive(mask):
    """(B, S) 0/1 mask -> (B, 1, 1, S) additive mask, as AI Hub's patched BERT export."""
    return ((1.0 - mask) * torch.finfo(mask.dtype).min)[:, None, None, :]


class _MaskedLM(nn.Module):
    """AI Hub BERT wrapper: MLM logits, gather the [MASK] row, argmax."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask, mask_indices):
        logits = self.model(tokens, attention_mask=_additive(mask), return_dict=False)[0]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return logits[rows, mask_indices.to(torch.int64)].argmax(dim=-1)


def _mlm(cls_name: str, cfg_name: str, **cfg):
    def build():
        t = _tf()
        config = getattr(t, cfg_name)(attn_implementation="eager", **cfg)
        return _eval(_MaskedLM(getattr(t, cls_name)(config)))
    return build


class _ElectraDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        t = _tf()
        cfg = t.ElectraConfig(embedding_size=768, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072,
                              attn_implementation="eager")
        self.model = t.ElectraForPreTraining(cfg)

    def forward(self, tokens, mask):
        logits = self.model(tokens, attention_mask=_additive(mask), return_dict=False)[0]
        return torch.round((torch.sign(logits[0]) + 1) / 2)


# --------------------------------------------------------------------------- whisper
def _whisper_decoder_inputs(size: str) -> Callable[[], tuple]:
    def inputs():
        d, layers, heads = _WHISPER[size]
        hd, s = d // heads, _DEC_LEN - 1
        self_kv = [t for _ in range(layers)
                   for t in (torch.zeros(heads, 1, hd, s), torch.zeros(heads, 1, s, hd))]
        cross_kv = [t for _ in range(layers) for t in
                    (torch.zeros(heads, 1, hd, _AUDIO_LEN), torch.zeros(heads, 1, _AUDIO_LEN, hd))]
        return (torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, _DEC_LEN),
                *self_kv, *cross_kv, torch.zeros(1, dtype=torch.int32))
    return inputs


# --------------------------------------------------------------------------- stable diffusion
def _unet_config(version: str) -> dict:
    common = dict(
        in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0, layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    )
    if version == "sdxl":
        return dict(common, sample_size=128, block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
    cfg = dict(common, block_out_channels=(320, 640, 1280, 1280),
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if version == "sd15":
        return dict(cfg, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return dict(cfg, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)  # sd21 (768-v; -base differs only in sample_size)


class _Unet(nn.Module):
    """AI Hub UNet wrapper: (latent, timestep (B,1), text_emb) -> noise prediction."""

    def __init__(self, version: str):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(**_unet_config(version))

    def forward(self, latent, timestep, text_emb, **added):
        cond = added or None
        return self.unet(latent, timestep.reshape(-1), text_emb, added_cond_kwargs=cond,
                         return_dict=False)[0]


def _unet_inputs(batch: int, size: int, text_dim: int) -> Callable[[], tuple]:
    return lambda: (torch.zeros(batch, 4, size, size), torch.zeros(batch, 1),
                    torch.zeros(batch, 77, text_dim))


class _VaeDecoder(nn.Module):
    """SD AutoencoderKL decoder path: unscale, post_quant_conv, decoder, to NHWC [0, 1]."""

    def __init__(self):
        super().__init__()
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            act_fn="silu", norm_num_groups=32, sample_size=512,
                            scaling_factor=0.18215)
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        img = self.decoder(self.post_quant_conv(z / 0.18215))
        return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def _clip_text(hidden, layers, heads, inter, act):
    def build():
        t = _tf()
        cfg = t.CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, intermediate_size=inter, hidden_act=act,
                               vocab_size=49408, max_position_embeddings=77)
        return _eval(_LogitsOnly(t.CLIPTextModel(cfg)))
    return build


def _tokens77():
    return (torch.zeros(1, 77, dtype=torch.int32),)


# --------------------------------------------------------------------------- Taming-DiT
def _dit_inputs(tokens: int) -> Callable[[], tuple]:
    return lambda: (torch.zeros(1, tokens, 128), torch.zeros(1, 128, 2048), torch.zeros(1, 256))


# --------------------------------------------------------------------------- registry
_reg("vit-b16-224", "torchvision ViT-B/16 classifier (AI Hub 'vit'); image 1x3x224x224",
     _vit_b16, _image(224))
_reg("beit-b16-224", "microsoft/beit-base-patch16-224 classifier (AI Hub 'beit'); 1x3x224x224",
     _beit_b16, _image(224))
_reg("mobilevit-small-256", "apple/mobilevit-small classifier (AI Hub 'mobile_vit'); 1x3x256x256",
     _mobilevit_s, _image(256))
_reg("convnext-tiny-224", "torchvision ConvNeXt-Tiny (AI Hub 'convnext_tiny'); 1x3x224x224",
     _convnext([3, 3, 9, 3], [96, 192, 384, 768]), _image(224))
_reg("convnext-base-224", "torchvision ConvNeXt-Base (AI Hub 'convnext_base'); 1x3x224x224",
     _convnext([3, 3, 27, 3], [128, 256, 512, 1024]), _image(224))
_reg("efficientnet-b0-224", "torchvision EfficientNet-B0 (AI Hub 'efficientnet_b0'); 1x3x224x224",
     _effnet(1.0, 1.0, 1280, 0.2), _image(224))
_reg("efficientnet-b4-224", "torchvision EfficientNet-B4 at AI Hub's 224 input (not native 380); 1x3x224x224",
     _effnet(1.4, 1.8, 1792, 0.4), _image(224))
_reg("resnet18-224", "torchvision ResNet-18 (AI Hub 'resnet18'); 1x3x224x224",
     _resnet("basic", [2, 2, 2, 2], [64, 128, 256, 512]), _image(224))
_reg("resnet50-224", "torchvision ResNet-50 v1.5 (AI Hub 'resnet50'); 1x3x224x224",
     _resnet("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]), _image(224))
_reg("resnet101-224", "torchvision ResNet-101 v1.5 (AI Hub 'resnet101'); 1x3x224x224",
     _resnet("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]), _image(224))
_reg("mobilenet-v2-224", "MobileNetV2 1.0 (AI Hub 'mobilenet_v2'); 1x3x224x224", _mobilenet_v2, _image(224))
_reg("openai-clip-b16", "OpenAI CLIP ViT-B/16, image+text towers and similarity (AI Hub 'openai_clip'); "
     "image 1x3x224x224, text 1x77 int32", lambda: _eval(_ClipScores()),
     lambda: (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.int32)))
_reg("depth-anything-small-518x392", "Depth Anything (V1/V2) small: DINOv2-S/14 + DPT head, "
     "coreml-examples wrapper; image 1x3x392x518 (WxH 518x392)", _depth_anything_small,
     lambda: (torch.zeros(1, 3, 392, 518),))
_reg("detr-resnet50-semantic-448", "DETR-ResNet50 panoptic folded to semantic map "
     "(apple/coreml-detr-semantic-segmentation); image 1x3x448x448",
     lambda: _eval(_DetrSemantic()), _image(448))
_reg("bert-base-mlm-384", "bert-base-uncased masked LM (AI Hub 'bert_base_uncased_hf'); tokens 1x384",
     _mlm("BertForMaskedLM", "BertConfig"), _bert_inputs)
_reg("distilbert-base-mlm-384", "distilbert-base-uncased masked LM; tokens 1x384",
     _mlm("DistilBertForMaskedLM", "DistilBertConfig"), _bert_inputs)
_reg("mobilebert-mlm-384", "google/mobilebert-uncased masked LM; tokens 1x384",
     _mlm("MobileBertForMaskedLM", "MobileBertConfig"), _bert_inputs)
_reg("albert-base-v2-mlm-384", "albert-base-v2 masked LM; tokens 1x384",
     _mlm("AlbertForMaskedLM", "AlbertConfig", embedding_size=128, hidden_size=768,
          num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), _bert_inputs)
_reg("electra-base-discriminator-384", "google/electra-base-discriminator; tokens 1x384",
     lambda: _eval(_ElectraDiscriminator()), lambda: _bert_inputs()[:2])
for _s in _WHISPER:
    _reg(f"whisper-{_s}-encoder", f"openai/whisper-{_s} encoder + cross-attn K/V projections "
         "(AI Hub HfWhisperEncoder); mel 1x80x3000",
         (lambda s=_s: _eval(WhisperEncoderKV(s))), lambda: (torch.zeros(1, 80, 3000),))
    _reg(f"whisper-{_s}-decoder", f"openai/whisper-{_s} one-token decoder step with KV caches "
         "(self 199, cross 1500) as in AI Hub HfWhisperDecoder",
         (lambda s=_s: _eval(WhisperDecoderStep(s))), _whisper_decoder_inputs(_s))
_reg("sd15-unet", "Stable Diffusion 1.5 UNet; latent 1x4x64x64, timestep 1x1, text 1x77x768",
     lambda: _eval(_Unet("sd15")), _unet_inputs(1, 64, 768))
_reg("sd21-unet", "Stable Diffusion 2.1 UNet; latent 1x4x64x64, timestep 1x1, text 1x77x1024",
     lambda: _eval(_Unet("sd21")), _unet_inputs(1, 64, 1024))
_reg("sd21-unet-cfg-b2", "Stable Diffusion 2.1(-base) UNet, CFG batch 2; latent 2x4x64x64, text 2x77x1024",
     lambda: _eval(_Unet("sd21")), _unet_inputs(2, 64, 1024))
_reg("sdxl-unet-cfg-b2-768", "SDXL base UNet, CFG batch 2 at 768x768; latent 2x4x96x96, text 2x77x2048, "
     "pooled 2x1280, time_ids 2x6", lambda: _eval(_Unet("sdxl")), _unet_inputs(2, 96, 2048),
     lambda: {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)})
_reg("sd-vae-decoder-512", "SD 1.5/2.1 AutoencoderKL decoder (same in both); latent 1x4x64x64 -> 512x512",
     lambda: _eval(_VaeDecoder()), lambda: (torch.zeros(1, 4, 64, 64),))
_reg("sd15-text-encoder", "SD 1.5 CLIP ViT-L/14 text encoder; tokens 1x77 int32",
     _clip_text(768, 12, 12, 3072, "quick_gelu"), _tokens77)
_reg("sd21-text-encoder", "SD 2.1 OpenCLIP ViT-H/14 text encoder (23 layers); tokens 1x77 int32",
     _clip_text(1024, 23, 16, 4096, "gelu"), _tokens77)
for _name, _tok in (("336", 336), ("1344", 1344), ("2496", 2496)):
    _reg(f"taming-dit-915m-{_name}tok", f"Taming-DiT mobile DiT approximation, one step over {_tok} "
         "latent tokens + 128 text tokens (seed 003, Table 3)",
         lambda: _eval(TamingDiT()), _dit_inputs(_tok))
