"""From masks to a dense, compact model with new widths (Taming-DiT: "the pruned model can be
converted into a dense and compact form ... without additional compilation or specialized hardware
support").

The result is a plain ``S2DiT`` of a plain config: ``num_heads`` = kept heads, ``attn_dim`` = kept
heads x head_dim, ``ffn_dim`` = kept channels, ``group_blocks`` = kept blocks per group. Its tensors
are slices of the masked model's: q/k/v rows and the LCHA conv channels of kept heads, o columns,
FFN rows / columns of kept channels; removed blocks are gone (they were a residual bypass).
"""

from __future__ import annotations

import dataclasses

import torch

from ...model_zoo.config import DiTConfig
from ...model_zoo.dit import S2DiT
from .masks import block_list, check_masks


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask > 0.5).flatten()


def dense_config(cfg: DiTConfig, masks: dict[str, torch.Tensor], group_of: list[int]) -> DiTConfig:
    heads = int((masks["heads"][0] > 0.5).sum())
    ffn = int((masks["ffn"][0] > 0.5).sum())
    for key, want in (("heads", heads), ("cross_heads", heads), ("ffn", ffn)):
        counts = {int((r > 0.5).sum()) for r in masks[key]}
        if counts != {want}:
            raise ValueError(f"{key} masks keep {sorted(counts)} units across blocks; a dense config needs one count")
    per_group = [0] * cfg.num_groups
    for i, n in enumerate(group_of):
        per_group[n] += int(masks["blocks"][i] > 0.5)
    return dataclasses.replace(cfg, num_heads=heads, attn_dim=heads * cfg.head_dim, ffn_dim=ffn,
                               group_blocks=tuple(per_group), search=False)


def _channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None]).flatten()


@torch.no_grad()
def _copy_attention(dst, src, heads: torch.Tensor, head_dim: int) -> None:
    ch = _channels(heads, head_dim)
    for name in ("q", "k", "v"):
        getattr(dst, name).weight.copy_(getattr(src, name).weight[ch])
        getattr(dst, name).bias.copy_(getattr(src, name).bias[ch])
    dst.o.weight.copy_(src.o.weight[:, ch])
    dst.o.bias.copy_(src.o.bias)
    dst.q_norm.load_state_dict(src.q_norm.state_dict())
    dst.k_norm.load_state_dict(src.k_norm.state_dict())
    if hasattr(src, "local"):  # LCHA: the depthwise conv over V keeps the kept heads' channels
        dst.local.weight.copy_(src.local.weight[ch])
        dst.local.bias.copy_(src.local.bias[ch])


@torch.no_grad()
def _copy_block(dst, src, mask_heads, mask_cross, mask_ffn, head_dim: int) -> None:
    for name in ("norm1", "norm2", "norm3"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    dst.modulation.copy_(src.modulation)
    _copy_attention(dst.attn, src.attn, _kept(mask_heads), head_dim)
    _copy_attention(dst.cross, src.cross, _kept(mask_cross), head_dim)
    ch = _kept(mask_ffn)
    dst.ffn[0].weight.copy_(src.ffn[0].weight[ch])
    dst.ffn[0].bias.copy_(src.ffn[0].bias[ch])
    dst.ffn[2].weight.copy_(src.ffn[2].weight[:, ch])
    dst.ffn[2].bias.copy_(src.ffn[2].bias)


@torch.no_grad()
def to_dense(dit: S2DiT, masks: dict[str, torch.Tensor]) -> S2DiT:
    """The compact model that computes what ``masked(dit, masks)`` computes."""
    check_masks(dit, masks)
    blocks = block_list(dit)
    cfg = dense_config(dit.cfg, masks, [n for n, *_ in blocks])
    dense = S2DiT(cfg).to(next(dit.parameters()).dtype)
    src_state = dit.state_dict()
    outer = {k: v for k, v in src_state.items() if not k.startswith("sandwich.groups.")}
    dense.load_state_dict(outer | {k: v for k, v in dense.state_dict().items() if k.startswith("sandwich.groups.")})
    next_index: dict[tuple[int, str], int] = {}
    for i, (n, branch, _j, blk) in enumerate(blocks):
        if masks["blocks"][i] <= 0.5:
            continue
        j_new = next_index.get((n, branch), 0)
        next_index[(n, branch)] = j_new + 1
        _copy_block(dense.sandwich.groups[n][branch][j_new], blk, masks["heads"][i], masks["cross_heads"][i],
                    masks["ffn"][i], dit.cfg.head_dim)
    return dense.eval()
