"""Write generated frames to mp4 (PyAV, H.264) or gif (imageio/Pillow) as they arrive, atomically.

Frames are streamed to the encoder chunk by chunk, so a long video never sits in memory; the file
is written next to the output under a temporary name and renamed only when it is complete, so a
failed run leaves no half file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np

from .errors import InputError, UsageError

SUFFIXES = (".mp4", ".gif")


def check_video_path(path: str | os.PathLike) -> Path:
    """Reject an unsupported output format before any expensive work happens."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"unsupported video format {path.suffix!r} for {path}; use one of {SUFFIXES}")
    return path


class VideoWriter:
    """``with VideoWriter(path, fps) as w: w.write(frames)`` for (T, H, W, 3) uint8 chunks."""

    def __init__(self, path: str | os.PathLike, fps: int):
        self.path = check_video_path(path)
        self.fps = int(fps)
        self.frames = 0
        self.shape: tuple[int, int] | None = None
        self._tmp: Path | None = None
        self._file = None

    def __enter__(self) -> "VideoWriter":
        import imageio.v3 as iio

        suffix = self.path.suffix.lower()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=suffix, dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        plugin = "pyav" if suffix == ".mp4" else "pillow"
        self._file = iio.imopen(tmp, "w", plugin=plugin)
        self._file.__enter__()
        if suffix == ".mp4":
            self._file.init_video_stream("libx264", fps=self.fps)
        return self

    def write(self, frames: np.ndarray) -> None:
        """Encode one chunk of frames now."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        if self.shape is not None and frames.shape[1:3] != self.shape:
            raise InputError(f"frame size changed from {self.shape} to {frames.shape[1:3]} (HxW)")
        self.shape = frames.shape[1:3]
        if self.path.suffix.lower() == ".mp4":
            for frame in frames:
                self._file.write_frame(frame, pixel_format="rgb24")
        else:
            self._file.write(frames, duration=1000.0 / self.fps, loop=0, is_batch=True)
        self.frames += len(frames)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        tmp = self._tmp
        try:
            self._file.__exit__(exc_type, exc, tb)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if exc_type is not None or self.frames == 0:
            tmp.unlink(missing_ok=True)
            if exc_type is None:
                raise InputError(f"no frames were written to {self.path}")
            return
        os.replace(tmp, self.path)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> Path:
    """frames (T, H, W, 3) uint8 -> ``path``; a failed write leaves no partial file behind."""
    path = check_video_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, fps) as writer:
        writer.write(frames)
    return path
