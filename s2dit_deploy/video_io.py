"""Write generated frames to mp4 (PyAV, H.264), gif (imageio/Pillow) or npy as they arrive, atomically.

``.npy`` keeps the exact uint8 frames (T, H, W, 3): what golden outputs and host-vs-host checks
compare, since H.264 and gif palettes are lossy.

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

SUFFIXES = (".mp4", ".gif", ".npy")


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
        if suffix == ".npy":  # raw frames now, the .npy header (it needs the frame count) at the end
            self._file = open(tmp + ".raw", "wb")
            return self
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
        if self.path.suffix.lower() == ".npy":
            self._file.write(np.ascontiguousarray(frames).tobytes())
        elif self.path.suffix.lower() == ".mp4":
            for frame in frames:
                self._file.write_frame(frame, pixel_format="rgb24")
        else:
            self._file.write(frames, duration=1000.0 / self.fps, loop=0, is_batch=True)
        self.frames += len(frames)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        tmp = self._tmp
        try:
            if self.path.suffix.lower() == ".npy":
                self._finish_npy(exc_type is None and self.frames > 0)
            else:
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


    def _finish_npy(self, keep: bool) -> None:
        """Header + the raw frames into the temporary .npy; the raw spool is always removed."""
        import shutil

        raw = Path(str(self._tmp) + ".raw")
        try:
            self._file.close()
            if keep:
                header = {"descr": "|u1", "fortran_order": False, "shape": (self.frames, *self.shape, 3)}
                with open(self._tmp, "wb") as out, open(raw, "rb") as src:
                    np.lib.format.write_array_header_1_0(out, header)
                    shutil.copyfileobj(src, out)
        finally:
            raw.unlink(missing_ok=True)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> Path:
    """frames (T, H, W, 3) uint8 -> ``path``; a failed write leaves no partial file behind."""
    path = check_video_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, fps) as writer:
        writer.write(frames)
    return path
