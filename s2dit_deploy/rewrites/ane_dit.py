"""S2DiT re-authored for the Neural Engine: the streaming ``step`` in the (B, C, 1, S) layout.

``rewrite_dit(model, grid, window, options)`` builds a new module tree and loads the float model's
state dict through the layers' pre-hooks; the input model is never touched. The rewritten model is
specialised to one chunk geometry (static shapes) and one time value per chunk (t of shape (B,)),
which is what the ``dit_step`` stage compiles. No tensor in it has rank > 4.

Optional AdaLN folding: for a fixed step schedule the timestep MLP and every block's modulation
collapse into a (6C x S) table per block; the graph then takes a one-hot step selector (1, S, 1, 1)
instead of t and selects a row with a 1x1 conv (exact: one-hot times table).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model_zoo.blocks import sinusoidal_embedding
from ..model_zoo.sandwich import route_static, switch_points
from ..model_zoo.softmax_attention import MASK_VALUE
from .ane_attention import FP16_MIN_NORMAL, AneCrossAttention, AneLCHA, AneSelfAttention
from .ane_layers import ChannelLayerNorm, Conv1x1, PatchConv2d

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AneOptions:
    """Rewrite switches. ``fold_schedule``: t values (e.g. a few-step schedule plus 0.0) to fold."""

    split_heads: bool = True
    fold_schedule: tuple[float, ...] | None = None
    # take context (B, L, C) and the RoPE tables (N, d) as the host has them and transpose inside
    # the graph: exact, a few small transposes per call, and four fewer host-side conversions
    fold_io: bool = True
    eps_floor: float = FP16_MIN_NORMAL


def _mods(e: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(e.split(n, dim=1))


class AneBlock(nn.Module):
    def __init__(self, cfg, kind: str, grid, opts: AneOptions):
        super().__init__()
        self.kind, self.dim = kind, cfg.dim
        self.norm1 = ChannelLayerNorm(cfg.dim, cfg.norm_eps)
        if kind == "L":
            self.attn = AneLCHA(cfg, grid, opts.split_heads, opts.eps_floor)
        else:
            self.attn = AneSelfAttention(cfg, opts.split_heads)
        self.norm3 = ChannelLayerNorm(cfg.dim, cfg.norm_eps)
        self.cross = AneCrossAttention(cfg, opts.split_heads)
        self.norm2 = ChannelLayerNorm(cfg.dim, cfg.norm_eps)
        self.ffn = nn.Sequential(
            Conv1x1(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Conv1x1(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 1, 6, cfg.dim))
        self.register_buffer("mod_table", None)

    def modulations(self, e: torch.Tensor) -> list[torch.Tensor]:
        """e: shared projection (B, 6C, 1, 1), or the one-hot selector (B, S, 1, 1) once folded."""
        if self.mod_table is not None:
            return _mods(F.conv2d(e, self.mod_table), self.dim)
        return _mods(e + self.modulation.reshape(1, 6 * self.dim, 1, 1), self.dim)

    def step(self, x, e, ctx, rope, cache, mask):
        shift, scale, gate, shift2, scale2, gate2 = self.modulations(e)
        h = self.norm1(x) * (1 + scale) + shift
        if self.kind == "L":
            a, entries = self.attn.step(h, rope, cache)
        else:
            a, entries = self.attn.step(h, rope, cache, mask)
        x = x + a * gate
        x = x + self.cross(self.norm3(x), ctx)
        x = x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2
        return x, entries


class AneDownsampler(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, stride, stride=stride)

    def forward(self, x, grid):
        b, c, _, _ = x.shape
        t, gh, gw = grid
        y = self.conv(x.reshape(b, c, t * gh, gw))
        return y.reshape(b, c, 1, -1)


class AneUpsampler(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = Conv1x1(dim, dim * stride * stride)

    def forward(self, x, low_grid):
        b = x.shape[0]
        t, gh, gw = low_grid
        y = self.proj(x)
        y = F.pixel_shuffle(y.reshape(b, y.shape[1], t * gh, gw), self.stride)
        return y.reshape(b, y.shape[1], 1, -1)


class AneSandwich(nn.Module):
    def __init__(self, cfg, hi_grid, lo_grid, opts: AneOptions):
        super().__init__()
        if cfg.search:
            raise ValueError("the ANE rewrite needs a fixed layout; derive one from the search routers first")
        self.cfg, self.hi_grid, self.lo_grid = cfg, hi_grid, lo_grid
        needs_up, needs_down = switch_points(cfg.routers)
        self.groups = nn.ModuleList()
        for n, kind in enumerate(cfg.layout):
            g = nn.ModuleDict()
            branch, bkind, grid = ("low", "S", lo_grid) if kind == "S" else ("high", kind, hi_grid)
            g[branch] = nn.ModuleList(AneBlock(cfg, bkind, grid, opts) for _ in range(cfg.blocks_in(n)))
            self.groups.append(g)
        self.ups = nn.ModuleDict({str(n): AneUpsampler(cfg.dim, cfg.ssa_stride) for n in sorted(needs_up)})
        self.downs = nn.ModuleDict({str(n): AneDownsampler(cfg.dim, cfg.ssa_stride) for n in sorted(needs_down)})

    def blocks(self):
        for n, g in enumerate(self.groups):
            for branch, blocks in g.items():
                for j, blk in enumerate(blocks):
                    yield f"groups.{n}.{branch}.{j}", blk

    def step(self, y, e, ctx, hi_rope, lo_rope, cache, masks):
        entries: dict[str, torch.Tensor] = {}

        def run(n, branch, x):
            rope, mask = (lo_rope, masks[1]) if branch == "low" else (hi_rope, masks[0])
            for j, blk in enumerate(self.groups[n][branch]):
                key = f"groups.{n}.{branch}.{j}"
                sub = {k[len(key) + 1 :]: v for k, v in cache.items() if k.startswith(key + ".")}
                x, new = blk.step(x, e, ctx, rope, sub, mask)
                entries.update({f"{key}.{k}": v for k, v in new.items()})
            return x

        out = route_static(
            self.cfg.routers, y,
            up=lambda n, y_s: self.ups[str(n)](y_s, self.lo_grid),
            down=lambda n, y_l: self.downs[str(n)](y_l, self.hi_grid),
            run=run,
        )
        return out, entries


class AneS2DiT(nn.Module):
    """Parameter names follow ``S2DiT`` so its state dict loads through the pre-hooks."""

    def __init__(self, cfg, grid: tuple[int, int, int], window: int, opts: AneOptions = AneOptions()):
        super().__init__()
        self.cfg, self.opts, self.grid, self.window = cfg, opts, grid, window
        s = cfg.ssa_stride
        self.lo_grid = (grid[0], grid[1] // s, grid[2] // s)
        c = cfg.latent_channels
        self.patch_embed = PatchConv2d(c, cfg.dim, cfg.patch_size)
        self.text_embedding = nn.Module()
        self.text_embedding.net = nn.Sequential(
            Conv1x1(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), Conv1x1(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Module()
        self.time_embedding.mlp = nn.Sequential(Conv1x1(cfg.freq_dim, cfg.dim), nn.SiLU(), Conv1x1(cfg.dim, cfg.dim))
        self.time_embedding.proj = nn.Sequential(nn.SiLU(), Conv1x1(cfg.dim, 6 * cfg.dim))
        self.sandwich = AneSandwich(cfg, grid, self.lo_grid, opts)
        self.head_norm = ChannelLayerNorm(cfg.dim, cfg.norm_eps)
        self.head_modulation = nn.Parameter(torch.zeros(1, 1, 2, cfg.dim))
        self.head = Conv1x1(cfg.dim, c * math.prod(cfg.patch_size))
        self.register_buffer("head_table", None)

    @property
    def folded(self) -> bool:
        return self.head_table is not None

    def _time(self, freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinusoidal features (B, freq_dim, 1, 1) -> temb (B, C, 1, 1), e (B, 6C, 1, 1).

        The features come from the host (fp32): t * 1000 reaches 1000 rad, which fp16 cannot
        resolve (ulp 0.5), so computing cos/sin on the device would scramble the embedding.
        """
        temb = self.time_embedding.mlp(freq)
        return temb, self.time_embedding.proj(temb)

    @torch.no_grad()
    def fold_schedule(self, timesteps: tuple[float, ...]) -> None:
        """Replace the timestep path by per-block tables for these t values (call after loading)."""
        t = torch.tensor(timesteps, dtype=torch.float32)
        freq = sinusoidal_embedding(t, self.cfg.freq_dim).to(self.head.weight.dtype)
        temb, e = self._time(freq.reshape(len(timesteps), -1, 1, 1))  # (S, C, 1, 1), (S, 6C, 1, 1)
        dim, steps = self.cfg.dim, len(timesteps)
        for _, blk in self.sandwich.blocks():
            table = e[:, :, 0, 0] + blk.modulation.reshape(1, 6 * dim)
            blk.mod_table = table.t().reshape(6 * dim, steps, 1, 1).contiguous()
        head = temb[:, None, :, 0, 0] + self.head_modulation.reshape(1, 2, dim)
        self.head_table = head.reshape(steps, 2 * dim).t().reshape(2 * dim, steps, 1, 1).contiguous()
        log.info("folded AdaLN modulation for schedule %s", timesteps)

    def key_masks(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive (1, 1, W*n + n, 1) masks over [window | chunk] keys at high and low resolution."""
        w = valid.shape[0]
        slot = ((1.0 - valid) * MASK_VALUE).reshape(1, 1, w, 1)
        out = []
        for grid in (self.grid, self.lo_grid):
            n = grid[0] * grid[1] * grid[2]
            past = slot.expand(1, 1, w, n).reshape(1, 1, w * n, 1)
            out.append(torch.cat([past, past.new_zeros(1, 1, n, 1)], dim=2))
        return out[0], out[1]

    def step(self, x, t_or_onehot, ctx, hi_cos, hi_sin, lo_cos, lo_sin, cache: dict[str, torch.Tensor]):
        """Device layout: x (B, 16, T*h, w), ctx (B, text_dim, 1, L), cos/sin (1, 1, d, n).

        ``t_or_onehot``: sinusoidal features of t (B, freq_dim, 1, 1), or once folded the one-hot
        step selector (B, S, 1, 1).
        """
        b = x.shape[0]
        y = self.patch_embed(x)
        y = y.reshape(b, y.shape[1], 1, -1)
        if self.folded:
            e = t_or_onehot
            shift, scale = F.conv2d(t_or_onehot, self.head_table).split(self.cfg.dim, dim=1)
        else:
            temb, e = self._time(t_or_onehot)
            hm = self.head_modulation.reshape(1, 2 * self.cfg.dim, 1, 1)
            shift, scale = (temb.repeat(1, 2, 1, 1) + hm).split(self.cfg.dim, dim=1)
        ctx = self.text_embedding.net(ctx)
        masks = self.key_masks(cache["window_valid"])
        y, entries = self.sandwich.step(y, e, ctx, (hi_cos, hi_sin), (lo_cos, lo_sin), cache, masks)
        out = self.head(self.head_norm(y) * (1 + scale) + shift)
        t, gh, gw = self.grid
        out = F.pixel_shuffle(out.reshape(b, out.shape[1], t * gh, gw), self.cfg.patch_size[1])
        return out, entries


def rewrite_dit(model: nn.Module, grid: tuple[int, int, int], window: int,
                opts: AneOptions = AneOptions()) -> AneS2DiT:
    """A new ANE-layout S2DiT with ``model``'s weights (the input is not modified)."""
    if getattr(model.cfg, "search", False):
        raise ValueError("the ANE rewrite needs a fixed layout; derive one from the search routers first")
    # Built on the meta device and filled with assign=True: the pre-hooks' reshapes are views, so
    # the rewrite shares the float model's weight memory (one copy of a 1.8B model, not two). The
    # result must therefore never be modified in place; fold_schedule only adds new tables.
    with torch.device("meta"):
        ane = AneS2DiT(model.cfg, grid, window, opts)
    ane.load_state_dict(model.state_dict(), strict=True, assign=True)
    if opts.fold_schedule is not None:
        ane.fold_schedule(tuple(opts.fold_schedule))
    return ane.eval()
