"""Frozen configuration dataclasses for every S2DiT stage.

Configs are plain data: they round-trip through JSON (``to_dict`` / ``from_dict``) so a checkpoint
folder's ``config.json`` fully describes the modules that its safetensors files must fill.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

# Wan2.1 latent interface: 16 channels, 4x temporal and 8x8 spatial compression.
LATENT_CHANNELS = 16
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8

LAYOUT_CHARS = {
    "L": "LCHA (linear attention + local conv), high resolution",
    "S": "SSA (softmax attention on the strided grid), low resolution",
    "F": "full softmax attention at high resolution (dense baseline / teacher, not in Algorithm 1)",
}

T = TypeVar("T")


class JsonConfig:
    """to_dict / from_dict for flat frozen config dataclasses (lists come back as tuples)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class DiTConfig(JsonConfig):
    """Sandwich DiT hyper-parameters.

    ``layout`` has one character per group of ``blocks_per_group`` blocks: ``L`` routes the group
    through its LCHA module (router m_n = 1), ``S`` through its SSA module (m_n = 0). Algorithm 1
    requires m_1 = m_M = 1, so a layout starts and ends with ``L`` (or ``F`` for dense baselines).
    ``search=True`` keeps both modules of every group plus differentiable routers.
    """

    dim: int
    num_heads: int
    ffn_dim: int
    layout: str
    text_dim: int
    latent_channels: int = LATENT_CHANNELS
    patch_size: tuple[int, int, int] = (1, 2, 2)
    blocks_per_group: int = 2
    ssa_stride: int = 2
    conv_kernel: tuple[int, int, int] = (3, 3, 3)
    rope_theta: float = 10000.0
    freq_dim: int = 256
    norm_eps: float = 1e-6
    linear_attn_eps: float = 1e-4
    search: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        bad = sorted(set(self.layout) - set(LAYOUT_CHARS))
        if not self.layout or bad:
            raise ValueError(
                f"layout {self.layout!r} has unknown group types {bad}; use {sorted(LAYOUT_CHARS)}"
            )
        if self.layout[0] == "S" or self.layout[-1] == "S":
            raise ValueError(
                f"layout {self.layout!r}: Algorithm 1 fixes m_1 = m_M = 1, so the first and last "
                "groups must be high resolution (L or F)"
            )
        if self.search and "F" in self.layout:
            raise ValueError("search mode routes between L and S only; remove F from the layout")
        if self.conv_kernel[0] < 1 or any(k % 2 == 0 for k in self.conv_kernel[1:]):
            raise ValueError(f"conv_kernel {self.conv_kernel}: spatial sizes must be odd")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_groups(self) -> int:
        return len(self.layout)

    @property
    def num_blocks(self) -> int:
        return len(self.layout) * self.blocks_per_group

    @property
    def routers(self) -> tuple[int, ...]:
        """Binary router values m_n of the fixed layout (1 = high-resolution branch)."""
        return tuple(0 if c == "S" else 1 for c in self.layout)

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Patch-token grid (t, h, w) for a latent of (frames, height, width)."""
        pt, ph, pw = self.patch_size
        if frames % pt or height % (ph * self.ssa_stride) or width % (pw * self.ssa_stride):
            raise ValueError(
                f"latent {frames}x{height}x{width} must be divisible by patch {self.patch_size} "
                f"times SSA stride {self.ssa_stride} spatially"
            )
        return frames // pt, height // ph, width // pw

    def with_layout(self, layout: str, search: bool | None = None) -> "DiTConfig":
        return dataclasses.replace(
            self, layout=layout, search=self.search if search is None else search
        )


@dataclass(frozen=True)
class TextEncoderConfig(JsonConfig):
    """CLIP text transformer size (transformers.CLIPTextConfig fields)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    projection_dim: int = 768


@dataclass(frozen=True)
class DecoderConfig(JsonConfig):
    """Efficient causal video decoder: latent (16, t, h, w) -> RGB (3, 4t, 8h, 8w).

    ``channels`` lists the width at each resolution, from the latent resolution upwards; there is
    one 2x spatial upsample between consecutive entries (so len == 4 for 8x). ``temporal_up_at``
    names the stages after which time is doubled (two of them give 4x).
    """

    latent_channels: int = LATENT_CHANNELS
    channels: tuple[int, ...] = (448, 176, 48, 24)
    blocks_per_stage: int = 1
    temporal_up_at: tuple[int, ...] = (1, 2)
    groups: int = 8
    out_channels: int = 3

    def __post_init__(self) -> None:
        if len(self.channels) != 4:
            raise ValueError("DecoderConfig.channels needs 4 entries (3 spatial 2x upsamples = 8x)")
        if len(self.temporal_up_at) != 2 or any(i >= 3 for i in self.temporal_up_at):
            raise ValueError("DecoderConfig.temporal_up_at needs 2 stage indices in [0, 2] (4x time)")
        for c in self.channels:
            if c % self.groups:
                raise ValueError(f"decoder width {c} not divisible by GroupNorm groups {self.groups}")


@dataclass(frozen=True)
class StreamConfig(JsonConfig):
    """Streaming geometry: latent frames per chunk and how many past chunks the caches keep."""

    chunk_frames: int = 3
    window_chunks: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """Everything a checkpoint folder's config.json holds."""

    name: str
    dit: DiTConfig
    text_encoder: TextEncoderConfig
    decoder: DecoderConfig
    stream: StreamConfig = field(default_factory=StreamConfig)
    height: int = 288
    width: int = 512
    fps: int = 16
    steps: int = 4

    @property
    def latent_hw(self) -> tuple[int, int]:
        if self.height % VAE_SPATIAL_FACTOR or self.width % VAE_SPATIAL_FACTOR:
            raise ValueError(f"{self.width}x{self.height} is not a multiple of {VAE_SPATIAL_FACTOR}")
        return self.height // VAE_SPATIAL_FACTOR, self.width // VAE_SPATIAL_FACTOR

    @property
    def chunk_latent_shape(self) -> tuple[int, int, int, int]:
        """(C, t, h, w) of one streaming chunk, e.g. 16x3x36x64 at 512x288."""
        h, w = self.latent_hw
        return (self.dit.latent_channels, self.stream.chunk_frames, h, w)

    def with_resolution(self, height: int, width: int) -> "ModelConfig":
        return dataclasses.replace(self, height=height, width=width)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dit": self.dit.to_dict(),
            "text_encoder": self.text_encoder.to_dict(),
            "decoder": self.decoder.to_dict(),
            "stream": self.stream.to_dict(),
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        try:
            return cls(
                name=data.pop("name"),
                dit=DiTConfig.from_dict(data.pop("dit")),
                text_encoder=TextEncoderConfig.from_dict(data.pop("text_encoder")),
                decoder=DecoderConfig.from_dict(data.pop("decoder")),
                stream=StreamConfig.from_dict(data.pop("stream", {})),
                **data,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"config.json is not a valid S2DiT model config: {exc}") from exc
