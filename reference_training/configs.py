"""Frozen, JSON-loadable configs of the training recipes (one dataclass per CLI subcommand).

A config file holds any subset of the fields; CLI flags override the file. Everything a run did is
written back as ``config.json`` in its output folder, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


def _build(cls: type[T], data: dict[str, Any]) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for k, v in data.items():
        default = getattr(cls, k, None) if not isinstance(getattr(cls, k, None), property) else None
        if isinstance(default, DataConfig) or k == "data":
            v = v if isinstance(v, DataConfig) else DataConfig(**v)
        elif isinstance(v, list):
            v = tuple(v)
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
