"""Softmax attention written out, with a multiplicative slot mask, for 8-bit activation paths.

Shared by the QNN and XNNPACK static-int8 lowerings. ``scaled_dot_product_attention`` with an
additive mask adds -3e4 to the scores of empty cache slots; in a per-tensor 8-bit activation range
that one constant leaves no resolution for the real scores (XNNPACK static int8 measured 18 dB on
the DiT step). Here the probabilities of the window slots are multiplied by the slot validity and
renormalised, which equals the masked softmax in exact math; cross-attention has no mask and is
only written out (no ``_safe_softmax`` guards, which no quantizer annotates).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _explicit_self_step(self, x, grid, rope, cache, key_mask):
    """SelfAttention.step with a multiplicative slot mask (equal to the additive one in exact math:
    exp(s) * valid / sum(exp(s) * valid); the current chunk is always valid, so the sum is > 0)."""
    from s2dit_deploy.model_zoo.softmax_attention import MASK_VALUE

    q, k, v = self._qkv(x, rope)
    keys = torch.cat([cache["k"], k], dim=2)
    scores = torch.matmul(q * self.head_dim ** -0.5, keys.transpose(-1, -2))
    probs = torch.softmax(scores, dim=-1)
    n_win = cache["k"].shape[2]
    valid = 1.0 - key_mask / MASK_VALUE  # (W*n,) in {0, 1}
    p_win = probs[..., :n_win] * valid
    p_cur = probs[..., n_win:]
    y = (torch.matmul(p_win, cache["v"]) + torch.matmul(p_cur, v)) / (
        p_win.sum(dim=-1, keepdim=True) + p_cur.sum(dim=-1, keepdim=True))
    return self._out(y), {"k": k, "v": v}


def _explicit_cross_forward(self, x, context):
    """CrossAttention.forward with the attention written out (no mask)."""
    q = self.q_norm(self._heads(self.q(x)))
    k = self.k_norm(self._heads(self.k(context)))
    v = self._heads(self.v(context))
    probs = torch.softmax(torch.matmul(q * self.head_dim ** -0.5, k.transpose(-1, -2)), dim=-1)
    return self.o(self._merge(torch.matmul(probs, v)))


def explicit_attention(module: nn.Module) -> int:
    """Swap every SelfAttention.step / CrossAttention.forward of ``module`` in place; returns the count."""
    from s2dit_deploy.model_zoo.softmax_attention import CrossAttention, SelfAttention

    count = 0
    for sub in module.modules():
        if isinstance(sub, SelfAttention):
            sub.step = types.MethodType(_explicit_self_step, sub)
            count += 1
        elif isinstance(sub, CrossAttention):
            sub.forward = types.MethodType(_explicit_cross_forward, sub)
            count += 1
    return count
