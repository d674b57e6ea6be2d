"""Write generated frames to mp4 (PyAV, H.264) or gif (Pillow) through imageio, atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

SUFFIXES = (".mp4", ".gif")


def check_video_path(path: str | os.PathLike) -> Path:
    """Reject an unsupported output format before any expensive work happens."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"unsupported video format {path.suffix!r}; use one of {SUFFIXES}")
    return path


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> Path:
    """frames (T, H, W, 3) uint8 -> ``path``; a failed write leaves no partial file behind."""
    import imageio.v3 as iio

    path = check_video_path(path)
    suffix = path.suffix.lower()
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".mp4":
            iio.imwrite(tmp, frames, plugin="pyav", codec="libx264", fps=fps,
                        out_pixel_format="yuv420p")
        else:
            iio.imwrite(tmp, frames, plugin="pillow", duration=1000.0 / fps, loop=0)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
