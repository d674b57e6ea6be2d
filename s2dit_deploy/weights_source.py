"""Find the float weights a bundle was compiled from, and prove they are the same weights.

Bundles record where their weights came from (``model.checkpoint`` = {"source": "bundled" | "user"
| "seeded", "name", "sha256"}), never an absolute path. ``validate``, ``bench`` and ``generate
--bundle`` all resolve it here: a "user" bundle needs ``--checkpoint DIR``, and the digest of the
folder used must match the record, or PSNRs would compare against the wrong model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import InputError, UsageError

log = logging.getLogger(__name__)


def _digest(folder: Path) -> str:
    try:
        from .model_zoo.checkpoint import checkpoint_digest
    except ImportError:  # older tree: the compiler hashed the folder with the bundle's hash
        from .bundle import sha256_path

        return sha256_path(Path(folder))
    return checkpoint_digest(folder)


def resolve_checkpoint(model: dict[str, Any], checkpoint: str | os.PathLike | None = None
                       ) -> tuple[str, Path | None]:
    """(model name, checkpoint folder or None for the registry's weights) for a bundle's model record."""
    from .model_zoo.registry import CARDS

    name = model.get("name")
    record = model.get("checkpoint")
    if not isinstance(name, str) or not name:
        raise InputError("the bundle's manifest has no model name (model.name); recompile the bundle")
    if record is None or isinstance(record, str):  # legacy manifest: no digest to check
        if checkpoint is not None:
            return name, Path(checkpoint)
        if isinstance(record, str) and Path(record).is_dir():
            log.warning("bundle records a legacy checkpoint path %s; its weights cannot be verified", record)
            return name, Path(record)
        return name, None
    if not isinstance(record, dict):
        raise InputError("the bundle's model.checkpoint must be an object {source, name, sha256}")
    source, ck_name, want = record.get("source"), record.get("name"), record.get("sha256")
    if source == "seeded":
        if checkpoint is not None:
            raise UsageError("this bundle was compiled from seeded (untrained) weights; drop --checkpoint")
        return name, None
    if source == "bundled":
        if name not in CARDS:
            raise InputError(f"this bundle uses the bundled weights of {name!r}, which this version "
                             "does not have; pass --checkpoint DIR")
        folder = Path(checkpoint) if checkpoint is not None else CARDS[name].bundled_weights
        if folder is None:
            raise InputError(f"{name!r} ships no bundled weights here; pass --checkpoint DIR")
    elif source == "user":
        if checkpoint is None:
            raise UsageError(f"this bundle was compiled from a user checkpoint named {ck_name!r}; "
                             "pass --checkpoint DIR")
        folder = Path(checkpoint)
    else:
        raise InputError(f"the bundle's model.checkpoint.source {source!r} is not bundled, user or seeded")
    if not folder.is_dir():
        raise InputError(f"--checkpoint {folder} is not a folder")
    got = _digest(folder)
    if want and got != want:
        raise InputError(f"checkpoint {folder} (sha256 {got[:12]}) is not the one this bundle was compiled "
                         f"from ({ck_name!r}, sha256 {str(want)[:12]}); pass the right --checkpoint DIR")
    return name, folder


def bundle_float_pipeline(bundle: Any, checkpoint: str | os.PathLike | None = None):
    """The float Pipeline a bundle was compiled from, at the bundle's resolution."""
    from .model_zoo.pipeline import load_pipeline

    name, folder = resolve_checkpoint(bundle.model, checkpoint)
    cfg = bundle.model.get("config") or {}
    return load_pipeline(name, folder, height=cfg.get("height"), width=cfg.get("width"))
