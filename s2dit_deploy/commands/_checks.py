"""Command-line value checks shared by the commands: each runs before any work and names its flag.

Argparse ``type=`` callables raise ``argparse.ArgumentTypeError`` (reported as a usage error, exit
2, naming the flag); checks that need several flags raise :class:`UsageError` themselves.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from s2dit_deploy.errors import OutputExistsError, UsageError

SPATIAL_MULTIPLE = 8  # the latent codec downsamples 8x in height and width
SEED_MAX = 2**63 - 1  # torch.manual_seed's range


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def seed(text: str) -> int:
    """An argparse type: a torch seed, 0 .. 2**63-1."""
    value = non_negative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"{value} is out of range 0..{SEED_MAX}")
    return value


def spatial(text: str) -> int:
    """An argparse type: a positive height or width, a multiple of 8."""
    value = positive_int(text)
    if value % SPATIAL_MULTIPLE:
        raise argparse.ArgumentTypeError(f"{value} must be a multiple of {SPATIAL_MULTIPLE}")
    return value


def resolution(text: str) -> tuple[int, int]:
    """An argparse type: 'HxW' -> (height, width), both positive multiples of 8."""
    h, sep, w = text.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must look like HEIGHTxWIDTH, e.g. 192x320")
    height, width = int(h), int(w)
    if height <= 0 or width <= 0 or height % SPATIAL_MULTIPLE or width % SPATIAL_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"{height}x{width} (HxW) must be positive multiples of {SPATIAL_MULTIPLE}, e.g. 192x320")
    return height, width


def stage_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated stage names, at least one, each known."""
    from s2dit_deploy.stages import STAGE_NAMES

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGE_NAMES]
    if not names or unknown:
        what = f"unknown stage(s) {', '.join(unknown)}" if unknown else "no stage given"
        raise argparse.ArgumentTypeError(f"{what}; valid stages: {', '.join(STAGE_NAMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a stage twice")
    return names


def writable_folder(folder: Path, flag: str) -> None:
    """The folder that will receive an output exists (or can be made) and is writable."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {probe} is not writable; choose another {flag}")


def output_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...], force: bool) -> Path:
    """Check an output file before the work: a supported extension, a writable folder that
    exists, and no existing file of the user's replaced without --force."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: unsupported video format {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {path.parent} is not writable")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; name a file")
    if path.exists() and not force:
        raise OutputExistsError(f"{flag} {path} already exists; pass --force to replace it")
    return path
