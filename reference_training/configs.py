"""Frozen, JSON-loadable configs of the training recipes (one dataclass per CLI subcommand).

A config file holds any subset of the fields; CLI flags override the file. Everything a run did is
written back as ``config.json`` in its output folder, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    height: int = 96
    width: int = 160
    chunks: int = 2  # clip length in 12-frame chunks
    seed: int = 0
    caption_drop: float = 0.3
    video_folder: str | None = None  # a folder of user videos instead of the synthetic set


@dataclass(frozen=True)
class CodecTrainConfig:
    out: str = "runs/codec"
    data: DataConfig = DataConfig(chunks=1)
    channels: tuple[int, ...] = (64, 96)
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    kl_weight: float = 1e-4
    stats_batches: int = 16
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10


@dataclass(frozen=True)
class PretrainConfig:
    out: str = "runs/pretrain"
    model: str = "s2dit-small"  # registry card whose DiT / text-encoder architecture is trained
    codec: str | None = "runs/codec"  # None: a seeded untrained codec (tests only)
    data: DataConfig = DataConfig()
    steps: int = 1000
    batch_size: int = 4  # global batch; split evenly across torchrun processes
    lr: float = 3e-4
    text_lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    text_dropout: float = 0.1  # empty prompt, so the teacher supports classifier-free guidance
    clean_context_prob: float = 0.25  # a past chunk is clean (t=0), as after the pipeline's commit pass
    logit_mean: float = 0.0
    logit_std: float = 1.0
    window: int = 2
    chunk_frames: int = 3
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    resume: bool = True


@dataclass(frozen=True)
class DistillConfig:
    out: str = "runs/distill"
    teacher: str = "runs/pretrain"  # a pretrain run folder (its EMA weights are the teacher)
    codec: str | None = "runs/codec"
    data: DataConfig = DataConfig()
    steps: int = 200
    batch_size: int = 2
    lr: float = 2e-5
    critic_lr: float = 1e-4
    critic_steps: int = 1  # critic updates per generator update (DMD2 uses 5)
    guidance: float = 3.0  # classifier-free guidance of the real score
    student_steps: tuple[int, ...] = (4, 2, 1)  # schedules sampled per iteration
    shift: float = 5.0
    rollout_chunks: int = 2
    min_t: float = 0.02
    max_t: float = 0.98
    ema_decay: float = 0.99
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    log_every: int = 5
    resume: bool = True


@dataclass(frozen=True)
class DecoderTrainConfig:
    out: str = "runs/decoder"
    model: str = "s2dit-small"
    codec: str | None = "runs/codec"
    classifier: str | None = "runs/classifier"  # feature network of the perceptual term
    data: DataConfig = DataConfig(chunks=1)
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    perceptual_weight: float = 0.1
    gan_weight: float = 0.0  # > 0 adds a hinge GAN term with a small patch discriminator
    latent_noise: float = 0.05  # robustness to the DiT's slightly-off latents
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    resume: bool = True


@dataclass(frozen=True)
class ClassifierTrainConfig:
    out: str = "runs/classifier"
    data: DataConfig = DataConfig()
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 1
    log_every: int = 20
    motion: bool = True  # frame-difference input channels (see metrics.VideoClassifier)


class RecipeConfigError(InputError):
    """A recipe config field has a wrong type or value; the message names the field."""


def _check(cfg, ints: dict[str, int] = {}, floats: dict[str, tuple[float, float]] = {},  # noqa: B006
           optional_ints: dict[str, int] = {}) -> None:  # noqa: B006
    """ints: name -> minimum; floats: name -> [low, high]; optional_ints: None or >= minimum."""
    name = type(cfg).__name__
    for key, low in {**ints, **optional_ints}.items():
        v = getattr(cfg, key)
        if v is None and key in optional_ints:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise RecipeConfigError(f"{name}.{key} must be an integer >= {low}, got {v!r}")
    for key, (low, high) in floats.items():
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise RecipeConfigError(f"{name}.{key} must be a number in [{low:g}, {high:g}], got {v!r}")


@dataclass(frozen=True)
class LatentRecipe:
    """Fields shared by the recipes that learn from latent sets (latent-flow, search, prune)."""

    latents: str | None = None  # latent set folder (default: <out>/latents, sampled from the source model)
    heldout: str | None = None  # held-out latent set (default: <out>/heldout; other prompts and noise)
    count: int = 512
    heldout_count: int = 64
    chunks: int = 2
    classifier: str | None = None  # metrics classifier folder: adds the FVD proxy to the result
    batch_size: int = 8
    clean_context_prob: float = 0.25
    logit_mean: float = 0.0
    logit_std: float = 1.0
    window: int = 2
    chunk_frames: int = 3
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    resume: bool = True

    def _check_common(self, ints: dict[str, int], floats: dict[str, tuple[float, float]],
                      optional_ints: dict[str, int] = {}) -> None:  # noqa: B006
        _check(self, ints={"count": 1, "heldout_count": 1, "chunks": 1, "batch_size": 1, "window": 1,
                           "chunk_frames": 1, "seed": 0, "checkpoint_every": 1, "log_every": 1, **ints},
               floats={"clean_context_prob": (0, 1), "logit_std": (1e-6, 100), "logit_mean": (-100, 100), **floats},
               optional_ints=optional_ints)
        for name in ("dit", "teacher_dit"):
            if not isinstance(getattr(self, name, {}), dict):
                raise RecipeConfigError(f"{type(self).__name__}.{name} must be an object of DiT config fields, "
                                        f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class LatentFlowConfig(LatentRecipe):
    """Train a DiT on a latent set: flow matching, or velocity KD from ``kd_from`` (the dense teacher)."""

    out: str = "runs/latent-flow"
    model: str = "s2dit-small"  # base card / checkpoint: text encoder, decoder, resolution, base DiT config
    dit: dict = field(default_factory=dict)  # DiT config fields to change, e.g. {"layout": "FFFFFF"}
    init: str | None = None  # checkpoint whose DiT weights start the run (F layouts inherit L/S blocks)
    kd_from: str | None = None  # a checkpoint: match its velocity instead of the flow-matching target
    steps: int = 300
    lr: float = 2e-4
    warmup: int = 20
    grad_clip: float = 1.0
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        self._check_common(ints={"steps": 1, "warmup": 0},
                           floats={"lr": (0, 1), "grad_clip": (0, 1e6), "ema_decay": (0, 1)})


@dataclass(frozen=True)
class SearchConfig(LatentRecipe):
    """Sandwich search (supplement A) from an all-self-attention teacher."""

    out: str = "runs/search"
    teacher: str = "runs/dense-teacher/model"  # checkpoint with an all-F layout
    k: int | None = None  # LCHA groups among the M-2 middle ones (default: the most the budget affords)
    budget: float | None = None  # in the cost unit (default: halfway between the cheapest and all-L)
    steps: int = 300
    lr: float = 1e-4
    router_lr: float = 5e-2
    tau_start: float = 1.0
    tau_end: float = 0.2
    max_eval_layouts: int = 64
    eval_batches: int = 4

    def __post_init__(self) -> None:
        self._check_common(ints={"steps": 1, "max_eval_layouts": 1, "eval_batches": 1}, optional_ints={"k": 0},
                           floats={"lr": (0, 1), "router_lr": (0, 100), "tau_start": (1e-3, 100), "tau_end": (1e-3, 100)})
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not math.isfinite(self.budget) or self.budget <= 0):
            raise RecipeConfigError(f"SearchConfig.budget must be a positive number, got {self.budget!r}")


@dataclass(frozen=True)
class PruneConfig(LatentRecipe):
    """KD-guided tri-level pruning (Taming-DiT Sec. 4.2) of a trained supernet checkpoint."""

    out: str = "runs/prune"
    teacher: str = "runs/wide/model"  # the supernet: pruned student starts from it, KD aligns to it
    teacher_dit: dict = field(default_factory=dict)  # --plan only: DiT fields changed on paper (a 2B base)
    keep_blocks: int | None = None  # blocks kept in all (>= 1 per group); default: all
    keep_heads: int | None = None  # heads kept per attention (self and cross); default: all
    keep_ffn: int | None = None  # FFN channels kept per block (a multiple of ffn_group); default: all
    target_params: int | None = None  # instead of the three: the least-pruned shape with at most this many DiT params
    ffn_group: int = 16  # channels per FFN mask unit (group-wise candidate sets)
    mask_steps: int = 100  # phase 1: masks learned jointly with the weights (Eq. 6 loss)
    finetune_steps: int = 200  # phase 2: the dense compact model, fine-tuned with Eq. 6
    lr: float = 1e-4
    mask_lr: float = 5e-2
    aligner_lr: float = 1e-3
    alpha: float = 0.01
    tau_start: float = 1.0
    tau_end: float = 0.2

    def __post_init__(self) -> None:
        self._check_common(ints={"ffn_group": 1, "mask_steps": 0, "finetune_steps": 0},
                           optional_ints={"keep_blocks": 0, "keep_heads": 0, "keep_ffn": 0, "target_params": 1},
                           floats={"lr": (0, 1), "mask_lr": (0, 100), "aligner_lr": (0, 1), "alpha": (0, 1e3),
                                   "tau_start": (1e-3, 100), "tau_end": (1e-3, 100)})
        explicit = [n for n in ("keep_blocks", "keep_heads", "keep_ffn") if getattr(self, n) is not None]
        if self.target_params is not None and explicit:
            raise RecipeConfigError(f"PruneConfig: give target_params or {explicit}, not both")


def _build(cls: type[T], data: dict[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise RecipeConfigError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls, k, None) if not isinstance(getattr(cls, k, None), property) else None
        if isinstance(default, DataConfig) or k == "data":
            v = v if isinstance(v, DataConfig) else DataConfig(**v)
        elif isinstance(v, list):
            v = tuple(v)
        elif isinstance(v, dict) and k not in ("dit", "teacher_dit"):
            raise RecipeConfigError(f"{cls.__name__}.{k} must not be an object, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Config from an optional JSON file plus non-None overrides (``data.height=...`` style keys allowed)."""
    data: dict[str, Any] = json.loads(Path(path).read_text()) if path else {}
    base = dataclasses.asdict(cls())
    base.update({k: v for k, v in data.items() if k != "data"})
    if "data" in data:  # merged, so a file naming one data field keeps the recipe's other defaults
        base["data"] = {**base["data"], **data["data"]}
    for k, v in overrides.items():
        if v is None:
            continue
        if k.startswith("data."):
            base["data"] = {**base["data"], k[5:]: v}
        else:
            base[k] = v
    return _build(cls, base)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def write_config(folder: str | Path, cfg) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
