"""Checkpoint folders: ``config.json`` + one safetensors file per stage, validated on load.

Never pickle: weights are read with safetensors only. Every failure names the file and says
what to do; nothing is half-loaded. Saving writes a temporary sibling folder and renames it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STAGE_FILES = {"dit": "dit.safetensors", "text_encoder": "text_encoder.safetensors", "decoder": "decoder.safetensors"}


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, corrupt, or does not match its config."""


def read_config(folder: str | os.PathLike) -> ModelConfig:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint folder needs {CONFIG_FILE} next to its weights")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid model config: {exc}") from exc


def load_state(folder: str | os.PathLike, stage: str, module: nn.Module) -> None:
    """Fill ``module`` from ``folder/<stage>.safetensors`` after checking names, shapes and values."""
    path = Path(folder) / STAGE_FILES[stage]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; expected files: {', '.join(STAGE_FILES.values())}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-export or re-download it") from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {wrong[:3]})")
        raise CheckpointError(
            f"{path} does not match its config.json: " + "; ".join(parts)
            + ". The weights belong to a different model size or layout."
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds NaN/inf values in {bad[:3]}; the checkpoint is corrupt")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden sibling temp folder; on success it replaces ``folder``, on failure it vanishes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700; checkpoints are meant to be shared
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(folder: str | os.PathLike, config: ModelConfig, modules: dict[str, nn.Module],
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json and one safetensors file per stage atomically (temp folder + rename)."""
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for stage, module in modules.items():
            state = {
                k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                for k, v in module.state_dict().items()
            }
            save_file(state, str(tmp / STAGE_FILES[stage]), metadata={"stage": stage, "model": config.name})
    log.info("saved checkpoint %s", folder)
    return Path(folder)
