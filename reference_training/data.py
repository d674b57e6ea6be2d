"""Captioned training videos: a procedural synthetic set (seeded, infinite) and a user-video folder.

Why procedural: the seeds train on internal data we cannot download. Shapes and digits moving over
solid colours or panning over scikit-learn's two sample photos give unlimited clips whose captions
are derived from the generating parameters, so text alignment can be checked against the labels.
Clip ``i`` of a dataset with seed ``s`` is drawn from ``numpy.random.default_rng([s, i])``: the same
(seed, index) always gives the same clip, in any process and in any order (DDP needs no sampler).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FRAMES_PER_CHUNK = 12  # 3 latent frames x 4 (the codec's temporal factor)

SHAPES = ("circle", "square", "triangle", "digit")
COLORS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (60, 90, 240),
    "yellow": (240, 220, 40), "white": (245, 245, 245), "purple": (160, 60, 210),
}
BACKGROUNDS = {"black": (0, 0, 0), "blue": (25, 45, 140), "gray": (120, 120, 120), "green": (20, 100, 40),
               "temple": None, "flower": None}
PHOTO_INDEX = {"temple": 0, "flower": 1}  # sklearn sample images: china.jpg, flower.jpg
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("moving", "bouncing")
SIZES = ("small", "large")
SPEEDS = ("slowly", "quickly")
NOUNS = {"circle": ("circle", "ball"), "square": ("square", "box"), "triangle": ("triangle",)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: attribute name -> class names; the metrics classifier has one head per attribute.
ATTRIBUTES = {
    "shape": SHAPES, "color": tuple(COLORS), "direction": DIRECTIONS, "motion": MOTIONS,
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class ClipParams:
    shape: str
    digit: int
    color: str
    background: str
    direction: str
    motion: str
    size: str
    speed: str
    x0: float
    y0: float
    pan_direction: str
    pan_offset: float

    def labels(self) -> dict[str, int]:
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def caption(p: ClipParams, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """Caption from parameters; with ``rng``/``drop`` the optional words (size, speed, direction) and
    the noun synonym are varied, so short prompts ("a red ball bouncing on a blue background") are
    in distribution too. The labels never change."""
    keep = (lambda: rng is None or rng.random() >= drop)
    if p.shape == "digit":
        noun = f"digit {DIGIT_WORDS[p.digit] if rng is not None and rng.random() < 0.5 else p.digit}"
    else:
        nouns = NOUNS[p.shape]
        noun = nouns[int(rng.integers(len(nouns)))] if rng is not None else nouns[0]
    words = ["a"] + ([p.size] if keep() else []) + [p.color, noun, p.motion]
    words += [p.speed] if rng is not None and keep() and rng.random() < 0.5 else []
    words += [p.direction] if keep() else []
    if BACKGROUNDS[p.background] is None:
        words += ["over", "a", "photo", "of", "a", p.background]
        words += ["with", "the", "camera", "panning", p.pan_direction] if keep() else []
    else:
        words += ["on", "a", p.background, "background"]
    return " ".join(words)


@lru_cache(maxsize=4)
def _photo(index: int, height: int) -> np.ndarray:
    """One sklearn sample photo resized to 1.5x the clip height (room to pan), float RGB."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    img = load_sample_images().images[index]
    h = int(round(height * 1.5))
    w = int(round(img.shape[1] * h / img.shape[0]))
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR), dtype=np.float32)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _pingpong(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect positions into [lo, hi] (a bounce off the walls)."""
    span = max(hi - lo, 1e-6)
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """Infinite-by-index procedural captioned clips; item -> dict(video (3,T,H,W) in [-1,1], caption, labels)."""

    def __init__(self, height: int = 96, width: int = 160, chunks: int = 2, seed: int = 0,
                 length: int = 1_000_000, caption_drop: float = 0.3):
        if height % 8 or width % 8:
            raise ValueError(f"{width}x{height}: clip size must be a multiple of 8 (the codec's spatial factor)")
        self.height, self.width, self.frames = height, width, FRAMES_PER_CHUNK * chunks
        self.seed, self.length, self.caption_drop = seed, length, caption_drop

    def __len__(self) -> int:
        return self.length

    def params(self, rng: np.random.Generator) -> ClipParams:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        colors = [c for c in COLORS if c != background]
        return ClipParams(
            shape=shape, digit=int(rng.integers(10)), color=colors[int(rng.integers(len(colors)))],
            background=background, direction=DIRECTIONS[int(rng.integers(4))],
            motion=MOTIONS[int(rng.integers(2))], size=SIZES[int(rng.integers(2))],
            speed=SPEEDS[int(rng.integers(2))], x0=float(rng.random()), y0=float(rng.random()),
            pan_direction=("left", "right")[int(rng.integers(2))], pan_offset=float(rng.random()),
        )

    def render(self, p: ClipParams, rng: np.random.Generator) -> np.ndarray:
        """(T, H, W, 3) float32 in [0, 255]."""
        T, H, W = self.frames, self.height, self.width
        r = (0.13 if p.size == "small" else 0.22) * H
        speed = (0.9 if p.speed == "slowly" else 2.0) * H / 96.0
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[p.direction]
        t = np.arange(T, dtype=np.float32)
        cx = _pingpong(r + p.x0 * (W - 2 * r) + dx * speed * t, r, W - r)
        cy = _pingpong(r + p.y0 * (H - 2 * r) + dy * speed * t, r, H - r)
        if p.motion == "bouncing":  # a hop perpendicular to the travel direction
            hop = np.abs(np.sin(np.pi * t / 12.0)) * 0.6 * r
            if dx:
                cy = np.clip(cy - hop, r, H - r)
            else:
                cx = np.clip(cx + hop, r, W - r)
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        ux = (xx[None] - cx[:, None, None]) / r  # (T, H, W) in shape units
        uy = (yy[None] - cy[:, None, None]) / r
        if p.shape == "circle":
            alpha = np.clip((1 - np.sqrt(ux**2 + uy**2)) * r + 0.5, 0, 1)
        elif p.shape == "square":
            alpha = np.clip((0.85 - np.maximum(np.abs(ux), np.abs(uy))) * r + 0.5, 0, 1)
        elif p.shape == "triangle":  # apex up: inside when below both slanted edges and above the base
            d = np.minimum(0.9 - uy, (uy + 0.9) * 0.5 - np.abs(ux) * 0.9)
            alpha = np.clip(d * r + 0.5, 0, 1)
        else:
            from scipy.ndimage import map_coordinates

            images, targets = _digits()
            choices = np.flatnonzero(targets == p.digit)
            img = images[choices[int(rng.integers(len(choices)))]]
            gx, gy = (ux + 1) * 4 - 0.5, (uy + 1) * 4 - 0.5
            alpha = map_coordinates(img, [gy.ravel(), gx.ravel()], order=1, mode="constant", cval=0.0)
            alpha = np.clip(alpha.reshape(T, H, W) * 1.6, 0, 1)
        bg = self.background(p, T)
        color = np.asarray(COLORS[p.color], np.float32)
        return bg * (1 - alpha[..., None]) + color * alpha[..., None]

    def background(self, p: ClipParams, T: int) -> np.ndarray:
        H, W = self.height, self.width
        solid = BACKGROUNDS[p.background]
        if solid is not None:
            return np.broadcast_to(np.asarray(solid, np.float32), (T, H, W, 3))
        photo = _photo(PHOTO_INDEX[p.background], H)
        room_x, room_y = photo.shape[1] - W, photo.shape[0] - H
        step = 1.0 * H / 96.0 * (-1 if p.pan_direction == "left" else 1)  # content moves opposite the camera
        xs = _pingpong(p.pan_offset * room_x + step * np.arange(T), 0, room_x).round().astype(int)
        y = int(room_y // 2)
        return np.stack([photo[y : y + H, x : x + W] for x in xs])

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        p = self.params(rng)
        frames = self.render(p, rng)
        cap = caption(p, rng, self.caption_drop)
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2) / 127.5 - 1.0
        return {"video": video, "caption": cap, "labels": p.labels(), "params": p}


def collate(items: list[dict]) -> dict:
    """Stack videos, keep captions as a list and labels as one LongTensor per attribute."""
    return {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
        "labels": {k: torch.tensor([it["labels"][k] for it in items]) for k in items[0]["labels"]},
    }


def global_batch(dataset, step: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
    """This rank's share of the deterministic global batch of ``step`` (clips step*B .. step*B+B-1)."""
    if batch_size % world:
        raise ValueError(f"global batch {batch_size} is not divisible by {world} processes")
    per = batch_size // world
    start = step * batch_size + rank * per
    return collate([dataset[(start + i) % len(dataset)] for i in range(per)])


def prompt_for(params: ClipParams) -> str:
    """The full caption (every attribute named), used for evaluation prompts."""
    return caption(params)


class VideoFolderDataset(torch.utils.data.Dataset):
    """User videos (any format PyAV reads) with captions from ``name.txt`` or ``captions.json``.

    Each video is resized to ``height`` x ``width`` and cut into non-overlapping clips of
    ``12 * chunks`` frames; labels are empty (no attributes are known).
    """

    EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")

    def __init__(self, folder: str | Path, height: int = 96, width: int = 160, chunks: int = 2):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"video folder {self.folder} does not exist")
        self.height, self.width, self.frames = height, width, FRAMES_PER_CHUNK * chunks
        table = self.folder / "captions.json"
        captions = json.loads(table.read_text()) if table.is_file() else {}
        self.clips: list[tuple[Path, int, str]] = []
        for path in sorted(p for p in self.folder.iterdir() if p.suffix.lower() in self.EXTENSIONS):
            side = path.with_suffix(".txt")
            text = captions.get(path.name) or (side.read_text().strip() if side.is_file() else None)
            if not text:
                raise ValueError(f"{path} has no caption: add {side.name} or an entry in captions.json")
            n = self._count(path) // self.frames
            self.clips += [(path, i * self.frames, text) for i in range(n)]
        if not self.clips:
            raise ValueError(f"{self.folder}: no video with at least {self.frames} frames")

    @staticmethod
    def _count(path: Path) -> int:
        import av

        with av.open(str(path)) as c:
            return sum(1 for _ in c.decode(video=0))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        import av

        path, start, text = self.clips[index]
        frames = []
        with av.open(str(path)) as c:
            for i, frame in enumerate(c.decode(video=0)):
                if i >= start + self.frames:
                    break
                if i >= start:
                    frames.append(frame.reformat(width=self.width, height=self.height, format="rgb24").to_ndarray())
        video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        return {"video": video, "caption": text, "labels": {}}
