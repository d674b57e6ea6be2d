"""Sandwich routing of Algorithm 1 (S2DiT supplement): M groups, each with a high-resolution LCHA
module f_L and a low-resolution SSA module f_S, binary routers m_n (m_1 = m_M = 1), branch-switch
triggers u_n / d_n, up/down samplers and the long-skip buffer S.

A fixed layout instantiates only the active module of each group and only the samplers that a
branch switch uses; a search model keeps everything plus Gumbel-softmax routers. Both run the same
recurrence; the static one skips the terms that are multiplied by a constant zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DiTBlock, Resolution
from .config import DiTConfig


def _to_frames(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    b, _, c = x.shape
    t, h, w = grid
    return x.view(b, t, h, w, c).permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w)


def _to_tokens(x: torch.Tensor, batch: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    t = bt // batch
    return x.view(batch, t, c, h, w).permute(0, 1, 3, 4, 2).reshape(batch, t * h * w, c)


class Downsampler(nn.Module):
    """down_n: per-frame strided conv (patch merging), initialised to s x s average pooling."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, stride, stride=stride)
        with torch.no_grad():
            self.conv.weight.zero_()
            idx = torch.arange(dim)
            self.conv.weight[idx, idx] = 1.0 / stride**2
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return _to_tokens(self.conv(_to_frames(x, grid)), x.shape[0])


class Upsampler(nn.Module):
    """up_n: per-token linear to s*s sub-tokens + pixel shuffle, initialised to nearest upsampling."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(dim, dim * stride * stride)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim).repeat_interleave(stride * stride, dim=0))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor, low_grid: tuple[int, int, int]) -> torch.Tensor:
        frames = F.pixel_shuffle(_to_frames(self.proj(x), low_grid), self.stride)
        return _to_tokens(frames, x.shape[0])


class SandwichRouters(nn.Module):
    """Learnable binary routers m_n via Gumbel-softmax with a straight-through estimator."""

    def __init__(self, num_groups: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_groups, 2))

    def forward(self, tau: float = 1.0) -> torch.Tensor:
        if self.training:
            onehot = F.gumbel_softmax(self.logits, tau=tau, hard=True)
        else:
            onehot = F.one_hot(self.logits.argmax(-1), 2).to(self.logits.dtype)
        m = onehot[:, 0]
        one = m.new_ones(1)
        return torch.cat([one, m[1:-1], one]) if m.numel() > 1 else one

    def layout(self) -> str:
        m = self.logits.argmax(-1) == 0
        chars = ["L" if bool(v) else "S" for v in m]
        chars[0] = chars[-1] = "L"
        return "".join(chars)


def switch_points(routers: tuple[int, ...]) -> tuple[set[int], set[int]]:
    """Groups where u_n = 1 (S -> L) and d_n = 1 (L -> S) for a fixed router vector, m_0 = 1."""
    ups, downs, prev = set(), set(), 1
    for n, m in enumerate(routers):
        if m > prev:
            ups.add(n)
        if m < prev:
            downs.add(n)
        prev = m
    return ups, downs


def route_static(routers: tuple[int, ...], y, up, down, run):
    """Algorithm 1 with constant routers: only the active branch and the used samplers run.

    ``up(n, y_s)``, ``down(n, y_l)`` and ``run(n, branch, x)`` are the group's samplers and modules;
    the float model and every device rewrite share this one recurrence.
    """
    y_l, y_s, skip, prev = y, None, None, 1
    for n, m in enumerate(routers):
        if m == 1:
            x_l = up(n, y_s) + skip if m > prev else y_l
            y_l = run(n, "high", x_l)
        else:
            if m < prev:
                skip = y_l
                x_s = down(n, y_l)
            else:
                x_s = y_s
            y_s = run(n, "low", x_s)
        prev = m
    return y_l


class Sandwich(nn.Module):
    """The M routed groups. Parameter names: groups.{n}.high.{j}, groups.{n}.low.{j}, ups.{n}, downs.{n}."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.search = cfg.search
        n_groups = cfg.num_groups
        needs_up, needs_down = switch_points(cfg.routers)
        self.groups = nn.ModuleList()
        for n, kind in enumerate(cfg.layout):
            g = nn.ModuleDict()
            per = cfg.blocks_in(n)
            if self.search or kind != "S":
                g["high"] = nn.ModuleList(DiTBlock(cfg, "F" if kind == "F" else "L") for _ in range(per))
            if self.search or kind == "S":
                g["low"] = nn.ModuleList(DiTBlock(cfg, "S") for _ in range(per))
            self.groups.append(g)
        up_at = range(n_groups) if self.search else sorted(needs_up)
        down_at = range(n_groups) if self.search else sorted(needs_down)
        self.ups = nn.ModuleDict({str(n): Upsampler(cfg.dim, cfg.ssa_stride) for n in up_at})
        self.downs = nn.ModuleDict({str(n): Downsampler(cfg.dim, cfg.ssa_stride) for n in down_at})
        self.routers = SandwichRouters(n_groups) if self.search else None

    # ---- full sequence ------------------------------------------------------------------------
    @staticmethod
    def _run(blocks, x, e, context, res, chunk_frames, window):
        for blk in blocks:
            x = blk(x, e, context, res, chunk_frames, window)
        return x

    def forward(self, y, e, context, hi: Resolution, lo: Resolution, chunk_frames=None, window=None,
                routers: torch.Tensor | None = None):
        """Algorithm 1. ``routers`` (M,) overrides the layout (search models; values in {0, 1})."""
        if self.search or routers is not None:
            m = routers if routers is not None else self.routers()
            return self._forward_routed(y, e, context, hi, lo, chunk_frames, window, m)
        run = lambda n, branch, x, res: self._run(  # noqa: E731
            self.groups[n][branch], x, e, context, res, chunk_frames, window
        )
        return self._route_static(y, hi, lo, run)

    def _route_static(self, y, hi: Resolution, lo: Resolution, run):
        return route_static(
            self.cfg.routers, y,
            up=lambda n, y_s: self.ups[str(n)](y_s, lo.grid),
            down=lambda n, y_l: self.downs[str(n)](y_l, hi.grid),
            run=lambda n, branch, x: run(n, branch, x, hi if branch == "high" else lo),
        )

    def _forward_routed(self, y, e, context, hi, lo, chunk_frames, window, m):
        """Lines 4-19 of Algorithm 1, literally, with both branches of every group computed."""
        run = lambda blocks, x, res: self._run(blocks, x, e, context, res, chunk_frames, window)  # noqa: E731
        y_l, y_s = y, self.downs["0"](y, hi.grid)
        skip = torch.zeros_like(y)
        m_prev = m.new_ones(())
        for n in range(len(self.groups)):
            m_n = m[n]
            u = torch.clamp(m_n - m_prev, min=0)
            d = torch.clamp(m_prev - m_n, min=0)
            x_l = (1 - u) * y_l + u * (self.ups[str(n)](y_s, lo.grid) + skip)
            x_s = (1 - d) * y_s + d * self.downs[str(n)](y_l, hi.grid)
            yt_l = run(self.groups[n]["high"], x_l, hi)
            yt_s = run(self.groups[n]["low"], x_s, lo)
            skip = d * y_l + (1 - d) * skip
            y_l = m_n * yt_l + (1 - m_n) * y_l
            y_s = (1 - m_n) * yt_s + m_n * y_s
            m_prev = m_n
        last = str(len(self.groups) - 1)
        return m[-1] * y_l + (1 - m[-1]) * self.ups[last](y_s, lo.grid)

    # ---- streaming ----------------------------------------------------------------------------
    def block_items(self):
        """(cache key prefix, block, uses_low_res) for every instantiated block, in run order."""
        for n, g in enumerate(self.groups):
            for branch in ("high", "low"):
                if branch in g:
                    for j, blk in enumerate(g[branch]):
                        yield f"groups.{n}.{branch}.{j}", blk, branch == "low"

    def step(self, y, e, context, hi: Resolution, lo: Resolution, cache, key_mask):
        """One chunk through the fixed layout with per-block caches; returns (out, new entries)."""
        if self.search:
            raise ValueError("streaming needs a fixed layout; derive one from the search routers first")
        entries: dict[str, torch.Tensor] = {}

        def run(n, branch, x, res):
            for j, blk in enumerate(self.groups[n][branch]):
                key = f"groups.{n}.{branch}.{j}"
                sub = {k[len(key) + 1 :]: v for k, v in cache.items() if k.startswith(key + ".")}
                x, new = blk.step(x, e, context, res, sub, key_mask)
                entries.update({f"{key}.{k}": v for k, v in new.items()})
            return x

        return self._route_static(y, hi, lo, run), entries
