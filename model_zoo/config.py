"""Frozen configuration dataclasses for every S2DiT stage.

Configs are plain data: they round-trip through JSON (``to_dict`` / ``from_dict``) so a checkpoint
folder's ``config.json`` fully describes the modules that its safetensors files must fill.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import InputError

# Wan2.1 latent interface: 16 channels, 4x temporal and 8x8 spatial compression.
LATENT_CHANNELS = 16
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8

LAYOUT_CHARS = {
    "L": "LCHA (linear attention + local conv), high resolution",
    "S": "SSA (softmax attention on the strided grid), low resolution",
    "F": "full softmax attention at high resolution (dense baseline / teacher, not in Algorithm 1)",
}

# Sanity bounds, checked before anything is built: a typo (``ffn_dim: 1e6``, a pasted 100,000-char
# layout) must fail in milliseconds, not allocate gigabytes. Paper scale is 14 groups, width 7168.
MAX_LAYOUT_GROUPS = 64
MAX_WIDTH = 65536  # any hidden / channel / ffn size
MAX_COUNT = 1 << 20  # vocab size, positions, layers, frames, strides: anything else countable
MAX_RESOLUTION = 8192  # output pixels per side

T = TypeVar("T")


class ConfigError(InputError):
    """A model config (config.json or one built in Python) has a wrong type or value; names the field."""


def _type_name(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_int(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a positive integer" if low >= 1 else f"an integer >= {low}"
        raise ConfigError(f"{where} must be {kind}, got {_type_name(value)}")
    if not low <= value <= high:
        raise ConfigError(f"{where} must be in [{low}, {high}], got {value}")
    return value


def _check_field(where: str, annotation: str, value: Any, low: int, high: int) -> Any:
    """Check one value against its (string) annotation; lists become tuples."""
    if annotation == "int":
        return _check_int(where, value, low, high)
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where} must be a positive finite number, got {_type_name(value)}")
        return float(value)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_type_name(value)}")
        return value
    if annotation == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty string, got {_type_name(value)}")
        return value
    if annotation.startswith("tuple[int"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of integers, got {_type_name(value)}")
        size = None if annotation.endswith("...]") else annotation.count("int")
        if size is not None and len(value) != size:
            raise ConfigError(f"{where} must have {size} entries, got {len(value)}")
        if len(value) > 64:
            raise ConfigError(f"{where} has {len(value)} entries; at most 64 are allowed")
        return tuple(_check_int(f"{where}[{i}]", v, low, high) for i, v in enumerate(value))
    raise TypeError(f"no validator for annotation {annotation!r} of {where}")  # a bug, not an input


class JsonConfig:
    """to_dict / from_dict plus type checks for flat frozen config dataclasses.

    ``_section`` prefixes field names in messages (``dit.dim``); ``_bounds`` overrides the default
    [1, MAX_COUNT] range of an int field. Checks run in ``__post_init__`` so configs built in Python
    obey the same rules as config.json; lists given for tuple fields are stored as tuples.
    """

    _section = ""
    _bounds: dict[str, tuple[int, int]] = {}

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            low, high = self._bounds.get(f.name, (1, MAX_COUNT))
            value = _check_field(f"{self._section}.{f.name}", str(f.type), getattr(self, f.name), low, high)
            object.__setattr__(self, f.name, value)

    def __post_init__(self) -> None:
        self._check_types()

    def _fail(self, message: str) -> None:
        raise ConfigError(f"{self._section}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        section = cls._section  # type: ignore[attr-defined]
        if not isinstance(data, dict):
            raise ConfigError(f"{section} must be a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = {f.name for f in fields}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{section}: unknown config keys {sorted(unknown)}")
        required = [f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
        missing = [n for n in required if n not in data]
        if missing:
            raise ConfigError(f"{section}: missing required keys {missing}")
        return cls(**data)


@dataclass(frozen=True)
class DiTConfig(JsonConfig):
    """Sandwich DiT hyper-parameters.

    ``layout`` has one character per group of ``blocks_per_group`` blocks: ``L`` routes the group
    through its LCHA module (router m_n = 1), ``S`` through its SSA module (m_n = 0). Algorithm 1
    requires m_1 = m_M = 1, so a layout starts and ends with ``L`` (or ``F`` for dense baselines).
    ``search=True`` keeps both modules of every group plus differentiable routers.

    Two fields let a pruned model (Taming-DiT's tri-level pruning) be a plain dense config that every
    target compiles: ``attn_dim`` is the width of the attention projections, num_heads x head_dim
    (0: ``dim``), so heads can go without narrowing the residual stream; ``group_blocks`` gives the
    block count of each group (empty: ``blocks_per_group`` each), so single blocks can go.
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
    attn_dim: int = 0
    group_blocks: tuple[int, ...] = ()

    _section = "dit"
    _bounds = {"dim": (1, MAX_WIDTH), "ffn_dim": (1, MAX_WIDTH), "text_dim": (1, MAX_WIDTH),
               "latent_channels": (1, MAX_WIDTH), "freq_dim": (1, MAX_WIDTH), "num_heads": (1, MAX_WIDTH),
               "blocks_per_group": (1, 64), "ssa_stride": (1, 64), "attn_dim": (0, MAX_WIDTH), "group_blocks": (1, 64), "patch_size": (1, 64), "conv_kernel": (1, 63)}

    def __post_init__(self) -> None:
        if isinstance(self.layout, str) and len(self.layout) > MAX_LAYOUT_GROUPS:  # before anything else
            self._fail(f"layout has {len(self.layout)} groups; at most MAX_LAYOUT_GROUPS = {MAX_LAYOUT_GROUPS}")
        self._check_types()
        width = "attn_dim" if self.attn_dim else "dim"
        if self.inner_dim % self.num_heads:
            self._fail(f"{width}={self.inner_dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            self._fail(f"head_dim={self.head_dim} ({width} / num_heads) must be even for RoPE")
        if self.group_blocks and len(self.group_blocks) != len(self.layout):
            self._fail(f"group_blocks has {len(self.group_blocks)} entries; layout {self.layout!r} has "
                       f"{len(self.layout)} groups (one block count per group, or [] for blocks_per_group each)")
        bad = sorted(set(self.layout) - set(LAYOUT_CHARS))
        if bad:
            self._fail(f"layout {self.layout!r} has unknown group types {bad}; use {sorted(LAYOUT_CHARS)}")
        if self.layout[0] == "S" or self.layout[-1] == "S":
            self._fail(
                f"layout {self.layout!r}: Algorithm 1 fixes m_1 = m_M = 1, so the first and last "
                "groups must be high resolution (L or F)"
            )
        if self.search and "F" in self.layout:
            self._fail("search mode routes between L and S only; remove F from the layout")
        if any(k % 2 == 0 for k in self.conv_kernel[1:]):
            self._fail(f"conv_kernel {self.conv_kernel}: spatial sizes must be odd")

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections (q, k, v in; o out): num_heads x head_dim."""
        return self.attn_dim or self.dim

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.num_heads

    def blocks_in(self, group: int) -> int:
        return self.group_blocks[group] if self.group_blocks else self.blocks_per_group

    @property
    def num_groups(self) -> int:
        return len(self.layout)

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks_in(n) for n in range(len(self.layout)))

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

    def to_dict(self) -> dict[str, Any]:
        """Fields; ``attn_dim`` / ``group_blocks`` only when set, so the config.json of every model
        without pruned widths reads exactly as it did before those fields existed."""
        d = super().to_dict()
        for name in ("attn_dim", "group_blocks"):
            if not d[name]:
                d.pop(name)
        return d

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

    _section = "text_encoder"
    _bounds = {"hidden_size": (1, MAX_WIDTH), "intermediate_size": (1, MAX_WIDTH),
               "projection_dim": (1, MAX_WIDTH), "num_hidden_layers": (1, 256),
               "num_attention_heads": (1, MAX_WIDTH), "max_position_embeddings": (1, 4096)}

    def __post_init__(self) -> None:
        self._check_types()
        if self.hidden_size % self.num_attention_heads:
            self._fail(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")


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

    _section = "decoder"
    _bounds = {"latent_channels": (1, MAX_WIDTH), "channels": (1, MAX_WIDTH), "blocks_per_stage": (1, 64),
               "temporal_up_at": (0, 2), "groups": (1, MAX_WIDTH), "out_channels": (1, 64)}

    def __post_init__(self) -> None:
        self._check_types()
        if len(self.channels) != 4:
            self._fail("channels needs 4 entries (3 spatial 2x upsamples = 8x)")
        if len(self.temporal_up_at) != 2:
            self._fail("temporal_up_at needs 2 stage indices in [0, 2] (4x time)")
        for c in self.channels:
            if c % self.groups:
                self._fail(f"decoder width {c} not divisible by GroupNorm groups {self.groups}")


@dataclass(frozen=True)
class StreamConfig(JsonConfig):
    """Streaming geometry: latent frames per chunk and how many past chunks the caches keep."""

    chunk_frames: int = 3
    window_chunks: int = 2

    _section = "stream"
    _bounds = {"chunk_frames": (1, 1024), "window_chunks": (1, 1024)}


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

    def __post_init__(self) -> None:
        for name, kind in (("dit", DiTConfig), ("text_encoder", TextEncoderConfig),
                           ("decoder", DecoderConfig), ("stream", StreamConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check_field("name", "str", self.name, 1, 1)
        _check_int("fps", self.fps, 1, 1000)
        from .sampler import SUPPORTED_STEPS  # the sampler owns which step counts exist

        if isinstance(self.steps, bool) or self.steps not in SUPPORTED_STEPS:
            raise ConfigError(f"steps must be one of {list(SUPPORTED_STEPS)} (the few-step schedules the "
                              f"sampler supports), got {_type_name(self.steps)}")
        _, ph, pw = self.dit.patch_size
        for name, patch in (("height", ph), ("width", pw)):
            multiple = VAE_SPATIAL_FACTOR * patch * self.dit.ssa_stride
            value = _check_int(name, getattr(self, name), 1, MAX_RESOLUTION)
            if value % multiple:
                raise ConfigError(
                    f"{name}={value} must be divisible by {multiple} (VAE factor {VAE_SPATIAL_FACTOR} x patch "
                    f"{patch} x SSA stride {self.dit.ssa_stride}); try {max(multiple, value // multiple * multiple)}"
                )

    @property
    def latent_hw(self) -> tuple[int, int]:
        if self.height % VAE_SPATIAL_FACTOR or self.width % VAE_SPATIAL_FACTOR:
            raise ValueError(f"{self.height}x{self.width} (HxW) is not a multiple of {VAE_SPATIAL_FACTOR}")
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
    def from_dict(cls, data: Any) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"the document must be a JSON object with keys name, dit, text_encoder, "
                              f"decoder, got {'null' if data is None else type(data).__name__}")
        data = dict(data)
        missing = [k for k in ("name", "dit", "text_encoder", "decoder") if k not in data]
        if missing:
            raise ConfigError(f"missing required keys {missing}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}")
        return cls(
            name=data.pop("name"),
            dit=DiTConfig.from_dict(data.pop("dit")),
            text_encoder=TextEncoderConfig.from_dict(data.pop("text_encoder")),
            decoder=DecoderConfig.from_dict(data.pop("decoder")),
            stream=StreamConfig.from_dict(data.pop("stream", {})),
            **data,
        )
