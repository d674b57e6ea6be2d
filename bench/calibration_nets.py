"""Networks written here for the calibration set, where no library model has the benchmarked graph.

AI Hub benchmarks Whisper as an encoder that also emits every decoder layer's cross-attention K/V
and a one-token decoder step with static caches; Taming-DiT's mobile DiT has no public code. These
modules reproduce those graphs' shapes and op mix (random weights, meta-device friendly) for
``calibration_models``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _tf():
    import transformers  # deferred: heavy import

    return transformers


_WHISPER = {"tiny": (384, 4, 6), "base": (512, 6, 8), "small": (768, 12, 12)}
_DEC_LEN, _AUDIO_LEN = 200, 1500  # AI Hub: MEAN_DECODE_LEN, AUDIO_EMB_LEN


def _whisper_config(size: str):
    d, layers, heads = _WHISPER[size]
    return _tf().WhisperConfig(d_model=d, encoder_layers=layers, decoder_layers=layers,
                               encoder_attention_heads=heads, decoder_attention_heads=heads,
                               encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, num_mel_bins=80,
                               vocab_size=51865, max_source_positions=1500,
                               max_target_positions=448)


class WhisperEncoderKV(nn.Module):
    """Encoder that also emits every decoder layer's cross-attention K/V cache."""

    def __init__(self, size: str):
        super().__init__()
        cfg = _whisper_config(size)
        self.heads = cfg.decoder_attention_heads
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.encoder = WhisperEncoder(cfg)
        d = cfg.d_model
        self.k = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(cfg.decoder_layers))
        self.v = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.decoder_layers))

    def forward(self, mel):
        h = self.encoder(mel, return_dict=False)[0]  # (1, 1500, d)
        b, n, d = h.shape
        out = []
        for k, v in zip(self.k, self.v):
            out.append(k(h).view(n, self.heads, 1, d // self.heads).permute(1, 2, 3, 0))
            out.append(v(h).view(n, self.heads, 1, d // self.heads).permute(1, 2, 0, 3))
        return tuple(out)


class WhisperDecoderStep(nn.Module):
    """One decoding step with static self-attention (199) and cross (1500) KV caches."""

    def __init__(self, size: str):
        super().__init__()
        d, layers, heads = _WHISPER[size]
        self.d, self.heads, self.layers = d, heads, layers
        self.tok = nn.Embedding(51865, d)
        self.pos = nn.Embedding(448, d)
        mk = lambda bias=True: nn.Linear(d, d, bias=bias)  # noqa: E731
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), q=mk(), k=mk(False), v=mk(), o=mk(),
            ln2=nn.LayerNorm(d), xq=mk(), xo=mk(),
            ln3=nn.LayerNorm(d), fc1=nn.Linear(d, 4 * d), fc2=nn.Linear(4 * d, d),
        )) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def _heads(self, x):  # (1, 1, d) -> (heads, 1, 1, hd)
        return x.view(self.heads, 1, 1, self.d // self.heads)

    def forward(self, input_ids, attention_mask, *rest):
        caches, position_ids = rest[:-1], rest[-1]
        L, hd = self.layers, self.d // self.heads
        x = self.tok(input_ids.long()) + self.pos(position_ids.long())[None]
        new = []
        for i, blk in enumerate(self.blocks):
            ks, vs = caches[2 * i], caches[2 * i + 1]
            kx, vx = caches[2 * L + 2 * i], caches[2 * L + 2 * i + 1]
            h = blk["ln1"](x)
            q, k, v = self._heads(blk["q"](h)), self._heads(blk["k"](h)), self._heads(blk["v"](h))
            k_all = torch.cat([ks, k.transpose(-1, -2)], dim=-1)  # (H,1,hd,200)
            v_all = torch.cat([vs, v], dim=-2)                      # (H,1,200,hd)
            a = torch.softmax(q @ k_all * hd ** -0.5 + attention_mask, dim=-1) @ v_all
            x = x + blk["o"](a.reshape(1, 1, self.d))
            new += [k_all[..., 1:], v_all[..., 1:, :]]
            h = blk["ln2"](x)
            a = torch.softmax(self._heads(blk["xq"](h)) @ kx * hd ** -0.5, dim=-1) @ vx
            x = x + blk["xo"](a.reshape(1, 1, self.d))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["ln3"](x))))
        logits = self.ln(x) @ self.tok.weight.t()  # tied output projection
        return (logits.view(1, -1, 1, 1), *new)


class DiTBlock(nn.Module):
    """Pre-norm DiT block: RMSNorm, self-attn (QK-RMSNorm, RoPE), cross-attn, GELU FFN,
    adaLN-single modulation (shift/scale/gate from a shared timestep vector)."""

    def __init__(self, d, heads, head_dim, ffn):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.hd = heads, head_dim
        self.n1, self.n2, self.n3 = nn.RMSNorm(d), nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * inner), nn.Linear(inner, d)
        self.xq, self.xkv, self.xo = nn.Linear(d, inner), nn.Linear(d, 2 * inner), nn.Linear(inner, d)
        self.qn, self.kn = nn.RMSNorm(head_dim), nn.RMSNorm(head_dim)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.mod = nn.Parameter(torch.zeros(6, d))

    def _split(self, x):
        return x.unflatten(-1, (self.heads, self.hd)).transpose(1, 2)

    def forward(self, x, ctx, t6, cos, sin):
        sh1, sc1, g1, sh2, sc2, g2 = (self.mod[None] + t6).unbind(1)
        h = self.n1(x) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = (self._split(z) for z in self.qkv(h).chunk(3, dim=-1))
        q, k = self.qn(q), self.kn(k)
        half = self.hd // 2
        rot = lambda z: z * cos + torch.cat([-z[..., half:], z[..., :half]], -1) * sin  # noqa: E731
        a = F.scaled_dot_product_attention(rot(q), rot(k), v)
        x = x + g1[:, None] * self.o(a.transpose(1, 2).flatten(2))
        kx, vx = (self._split(z) for z in self.xkv(ctx).chunk(2, dim=-1))
        a = F.scaled_dot_product_attention(self._split(self.xq(self.n2(x))), kx, vx)
        x = x + self.xo(a.transpose(1, 2).flatten(2))
        h = self.n3(x) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TamingDiT(nn.Module):
    """Approximation of the Taming-DiT mobile model (915M): width 2048, 20 blocks,
    20 heads x 64, FFN 6144, patch size 1 over a 128-channel latent."""

    def __init__(self, d=2048, depth=20, heads=20, head_dim=64, ffn=6144, latent_ch=128):
        super().__init__()
        self.hd = head_dim
        self.patch = nn.Linear(latent_ch, d)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.t_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DiTBlock(d, heads, head_dim, ffn) for _ in range(depth))
        self.norm, self.out = nn.RMSNorm(d), nn.Linear(d, latent_ch)

    def forward(self, latent_tokens, text_emb, t_freq):
        n = latent_tokens.shape[1]
        pos = torch.arange(n, device=latent_tokens.device, dtype=latent_tokens.dtype)
        inv = torch.ones(self.hd // 2, device=pos.device, dtype=pos.dtype)
        ang = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)
        cos, sin = ang.cos(), ang.sin()
        temb = self.t_mlp(t_freq)
        t6 = self.t_mod(temb).unflatten(-1, (6, -1))
        x = self.patch(latent_tokens)
        for blk in self.blocks:
            x = blk(x, text_emb, t6, cos, sin)
        return self.out(self.norm(x))
