"""LinConv Hybrid Attention (LCHA): ReLU linear attention with RoPE inside (Eq. 11) + local 3D conv.

Eq. 11 rotates the kernel features phi(q), phi(k) in the numerator only; the denominator uses the
unrotated features so it stays a sum of non-negative terms (no division by ~0). Because the
numerator factorises as (R phi(q))^T [sum_n (R phi(k_n)) v_n^T], a chunk's keys reduce to a
(d x d) state plus a d-vector, which is what the streaming cache keeps per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiTConfig
from .rope import apply_rope
from .softmax_attention import HeadProjections


def kernel_features(x: torch.Tensor) -> torch.Tensor:
    """phi: the ReLU kernel of the linear attention."""
    return F.relu(x)


def linear_attention_state(
    phi_k: torch.Tensor, phi_k_rot: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-side sums over tokens: kv = sum_n R phi(k_n) v_n^T (B,H,d,d), ksum = sum_n phi(k_n) (B,H,d)."""
    # matmuls, not einsum: ONNX exports einsum as an Einsum node, which NPU compilers reject
    kv = torch.matmul(phi_k_rot.transpose(-1, -2), v)
    return kv, phi_k.sum(dim=2)


def linear_attention_readout(
    phi_q: torch.Tensor,
    phi_q_rot: torch.Tensor,
    kv: torch.Tensor,
    ksum: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Query side of Eq. 11: (R phi(q))^T kv / (phi(q)^T ksum + eps), per head."""
    num = torch.matmul(phi_q_rot, kv)
    den = torch.matmul(phi_q, ksum.unsqueeze(-1)) + eps
    return num / den


def chunk_window_matrix(num_chunks: int, window: int | None, causal: bool) -> torch.Tensor:
    """(C, C) 0/1 matrix: query chunk c sees key chunk c' iff c - window <= c' <= c (if causal)."""
    cq = torch.arange(num_chunks)[:, None]
    ck = torch.arange(num_chunks)[None, :]
    if not causal:
        return torch.ones(num_chunks, num_chunks)
    allowed = ck <= cq
    if window is not None:
        allowed &= (cq - ck) <= window
    return allowed.float()


class LinConvHybridAttention(HeadProjections):
    """LCHA self-attention at full token resolution.

    Global path: linear attention of Eq. 11 over the visible chunks. Local path: a depthwise 3D conv
    over V on the (t, h, w) grid, causal in time (it looks back ``kt - 1`` frames), whose streaming
    cache is the V tail of the previous chunk.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        self.eps = cfg.linear_attn_eps
        kt, kh, kw = cfg.conv_kernel
        self.tail = kt - 1
        self.local = nn.Conv3d(
            cfg.inner_dim, cfg.inner_dim, cfg.conv_kernel, padding=(0, kh // 2, kw // 2), groups=cfg.inner_dim
        )

    def _features(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        q = kernel_features(self.q_norm(self._heads(self.q(x))))
        k = kernel_features(self.k_norm(self._heads(self.k(x))))
        v = self._heads(self.v(x))
        cos, sin = rope
        return q, apply_rope(q, cos, sin), k, apply_rope(k, cos, sin), v

    def _local(self, v: torch.Tensor, grid: tuple[int, int, int], past: torch.Tensor) -> torch.Tensor:
        """Depthwise conv over [past tail | current] frames; returns (B, N, C) for the current frames."""
        b, h, n, d = v.shape
        t, gh, gw = grid
        vg = v.transpose(1, 2).reshape(b, t, gh, gw, h * d).permute(0, 4, 1, 2, 3)
        y = self.local(torch.cat([past, vg], dim=2))
        return y.permute(0, 2, 3, 4, 1).reshape(b, n, h * d)

    def forward(self, x, grid, rope, chunk_frames: int | None, window: int | None):
        """Full sequence; with ``chunk_frames`` it is block-causal with a window of past chunks."""
        q, q_rot, k, k_rot, v = self._features(x, rope)
        b, h, n, d = q.shape
        t = grid[0]
        chunks = 1 if chunk_frames is None else t // chunk_frames
        if chunk_frames is not None and t % chunk_frames:
            raise ValueError(f"{t} frames are not a whole number of {chunk_frames}-frame chunks")
        per = n // chunks
        kc, kc_rot, vc = (z.reshape(b, h, chunks, per, d) for z in (k, k_rot, v))
        kv = torch.einsum("bhcnd,bhcne->bhcde", kc_rot, vc)
        ksum = kc.sum(dim=3)
        vis = chunk_window_matrix(chunks, window, chunk_frames is not None).to(x.device, x.dtype)
        kv_q = torch.einsum("qc,bhcde->bhqde", vis, kv)
        ksum_q = torch.einsum("qc,bhcd->bhqd", vis, ksum)
        qc, qc_rot = q.reshape(b, h, chunks, per, d), q_rot.reshape(b, h, chunks, per, d)
        num = torch.einsum("bhcnd,bhcde->bhcne", qc_rot, kv_q)
        den = torch.einsum("bhcnd,bhcd->bhcn", qc, ksum_q) + self.eps
        glob = (num / den.unsqueeze(-1)).reshape(b, h, n, d)
        past = v.new_zeros(b, h * d, self.tail, grid[1], grid[2])
        return self.o(self._merge(glob) + self._local(v, grid, past))

    def step(self, x, grid, rope, cache: dict[str, torch.Tensor]):
        """One chunk against cached per-chunk states; returns (out, this chunk's cache entries)."""
        q, q_rot, k, k_rot, v = self._features(x, rope)
        kv_cur, ksum_cur = linear_attention_state(k, k_rot, v)
        kv = kv_cur + cache["kv"].sum(dim=0)
        ksum = ksum_cur + cache["ksum"].sum(dim=0)
        glob = linear_attention_readout(q, q_rot, kv, ksum, self.eps)
        b, h, n, d = v.shape
        out = self.o(self._merge(glob) + self._local(v, grid, cache["vtail"]))
        t, gh, gw = grid
        vg = v.transpose(1, 2).reshape(b, t, gh, gw, h * d).permute(0, 4, 1, 2, 3)
        tail = torch.cat([cache["vtail"], vg], dim=2)[:, :, -self.tail :] if self.tail else cache["vtail"]
        return out, {"kv": kv_cur, "ksum": ksum_cur, "vtail": tail}

    def cache_shapes(self, batch: int, grid: tuple[int, int, int], window: int) -> dict[str, tuple]:
        h, d = self.num_heads, self.head_dim
        return {
            "kv": (window, batch, h, d, d),
            "ksum": (window, batch, h, d),
            "vtail": (batch, h * d, self.tail, grid[1], grid[2]),
        }
