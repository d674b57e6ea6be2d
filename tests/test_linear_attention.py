"""Eq. 11 (RoPE inside ReLU linear attention) against the explicit N x N formula, and RoPE itself."""

import torch

from s2dit_deploy.model_zoo.linear_attention import (
    LinConvHybridAttention,
    kernel_features,
    linear_attention_readout,
    linear_attention_state,
)
from s2dit_deploy.model_zoo.rope import apply_rope, rope_cos_sin

from .conftest import tiny_dit_config

EPS = 1e-4


def explicit_eq11(q, k, v, cos, sin, allowed=None):
    """Eq. 11 written out token by token: numerator rotated, denominator not."""
    pq, pk = kernel_features(q), kernel_features(k)
    rq, rk = apply_rope(pq, cos, sin), apply_rope(pk, cos, sin)
    b, h, n, d = q.shape
    out = torch.zeros_like(v, dtype=torch.float64)
    for m in range(n):
        num = torch.zeros(b, h, d, dtype=torch.float64)
        den = torch.zeros(b, h, dtype=torch.float64)
        for j in range(n):
            if allowed is not None and not allowed[m, j]:
                continue
            num += (rq[:, :, m] * rk[:, :, j]).sum(-1, keepdim=True).double() * v[:, :, j].double()
            den += (pq[:, :, m] * pk[:, :, j]).sum(-1).double()
        out[:, :, m] = num / (den[..., None] + EPS)
    return out


def test_eq11_factorised_equals_explicit():
    grid = (2, 3, 4)
    n, d = 24, 12
    q, k, v = (torch.randn(2, 3, n, d) for _ in range(3))
    cos, sin = rope_cos_sin(grid, d)
    pq, pk = kernel_features(q), kernel_features(k)
    kv, ksum = linear_attention_state(pk, apply_rope(pk, cos, sin), v)
    fast = linear_attention_readout(pq, apply_rope(pq, cos, sin), kv, ksum, EPS)
    ref = explicit_eq11(q, k, v, cos, sin)
    assert torch.allclose(fast.double(), ref, atol=1e-5, rtol=1e-5)
    # RoPE in the denominator would change the result: the test can tell the two apart.
    rq = apply_rope(pq, cos, sin)
    wrong = linear_attention_readout(rq, rq, *linear_attention_state(apply_rope(pk, cos, sin), apply_rope(pk, cos, sin), v), EPS)
    assert not torch.allclose(wrong.double(), ref, atol=1e-3)


def test_lcha_block_causal_window_equals_explicit_masked_formula():
    cfg = tiny_dit_config()
    attn = LinConvHybridAttention(cfg).eval()
    torch.nn.init.zeros_(attn.local.weight)
    torch.nn.init.zeros_(attn.local.bias)  # isolate the global (Eq. 11) path
    grid, chunk, window = (9, 2, 2), 3, 1
    n = 9 * 4
    x = torch.randn(1, n, cfg.dim)
    cos, sin = rope_cos_sin(grid, cfg.head_dim)
    with torch.no_grad():
        out = attn(x, grid, (cos, sin), chunk, window)
        q = attn.q_norm(attn._heads(attn.q(x)))
        k = attn.k_norm(attn._heads(attn.k(x)))
        v = attn._heads(attn.v(x))
        c = torch.arange(9).repeat_interleave(4) // chunk
        allowed = (c[:, None] >= c[None, :]) & (c[:, None] - c[None, :] <= window)
        ref = explicit_eq11(q, k, v, cos, sin, allowed).float()
        ref = attn.o(ref.transpose(1, 2).reshape(1, n, cfg.dim))
    assert (out - ref).abs().max() <= 1e-5


def test_rope_preserves_norms_and_is_relative():
    d = 64
    x = torch.randn(5, 4 * 6 * 8, d)
    cos, sin = rope_cos_sin((4, 6, 8), d, frame_offset=7)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # (R_m q)^T (R_n k) depends only on m - n: shifting time by the same offset changes nothing.
    q, k = torch.randn(2, d), torch.randn(2, d)
    c0, s0 = rope_cos_sin((2, 1, 1), d, frame_offset=0)
    c9, s9 = rope_cos_sin((2, 1, 1), d, frame_offset=9)
    dot0 = (apply_rope(q[:1], c0[:1], s0[:1]) * apply_rope(k[1:], c0[1:], s0[1:])).sum()
    dot9 = (apply_rope(q[:1], c9[:1], s9[:1]) * apply_rope(k[1:], c9[1:], s9[1:])).sum()
    assert torch.allclose(dot0, dot9, atol=1e-4)
    assert not torch.allclose(cos, rope_cos_sin((4, 6, 8), d)[0])
