"""Streaming text-to-video: text -> per chunk (few denoising steps with caches, commit, decode) -> frames.

``commit`` chooses which DiT call's cache entries are pushed into the KV window after a chunk:

- ``"clean"`` (default): the DiT runs once more on the clean chunk at t = 0 and only that pass's
  entries are committed (the Self-Forcing / CausVid recipe), so later chunks attend to clean
  context; steps + 1 DiT calls per chunk.
- ``"last-step"``: the entries the last denoising step already returned (its input is the latent
  at the last timestep, not the clean chunk) are committed; no extra call, steps DiT calls per
  chunk (the count of the paper's Table A3).

The first chunk does not depend on ``commit``; later chunks attend to what was committed. The
decoder streams with its own causal cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import portable_rng
from .config import ModelConfig
from .registry import load_stage, resolve
from .sampler import FewStepSchedule, sample

log = logging.getLogger(__name__)

COMMIT_MODES = ("clean", "last-step")  # s2dit_deploy/commands/generate.py repeats them (no torch at --help)


def check_commit(commit: str) -> str:
    """``commit`` is one of COMMIT_MODES (a ValueError naming the option otherwise)."""
    if commit not in COMMIT_MODES:
        raise ValueError(f"commit must be one of {', '.join(map(repr, COMMIT_MODES))}, got {commit!r}")
    return commit


def dit_calls_per_chunk(steps: int, commit: str = "clean") -> int:
    """DiT evaluations per streamed chunk: the denoising steps, plus the t = 0 pass for ``clean``."""
    return steps + (check_commit(commit) == "clean")


@dataclass
class StreamState:
    """Everything carried from one chunk to the next."""

    dit_cache: dict[str, torch.Tensor]
    decoder_cache: list[torch.Tensor]
    frame_offset: int = 0


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B=1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    v = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().numpy()


class Pipeline:
    """Text encoder + S2DiT + efficient decoder + few-step streaming sampler."""

    def __init__(self, config: ModelConfig, text_encoder, dit, decoder):
        self.config = config
        self.text_encoder = text_encoder
        self.dit = dit
        self.decoder = decoder

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        from .tokenizer import tokenize

        ids = tokenize(prompt, max_length=self.config.text_encoder.max_position_embeddings)
        return self.text_encoder(ids)

    def start(self, batch: int = 1) -> StreamState:
        h, w = self.config.latent_hw
        return StreamState(
            dit_cache=self.dit.init_cache(batch, (h, w), self.config.stream),
            decoder_cache=self.decoder.init_cache(batch, h, w),
        )

    @torch.no_grad()
    def denoise_chunk(self, noise: torch.Tensor, context: torch.Tensor, state: StreamState,
                      schedule: FewStepSchedule, generator: torch.Generator | None = None,
                      renoise=None, commit: str = "clean") -> torch.Tensor:
        """Few-step sampling of one chunk against the cache, then commit it (see ``commit`` above).

        Re-noise comes from ``renoise(step, shape)`` when given, else from ``generator``."""
        check_commit(commit)
        dit, cache, offset = self.dit, state.dit_cache, state.frame_offset
        last: dict[str, dict[str, torch.Tensor]] = {}

        def velocity(x, t):
            v, last["entries"] = dit.step(x, t, context, cache, offset)
            return v

        x0 = sample(velocity, noise, schedule, generator, renoise)
        if commit == "clean":
            _, entries = dit.step(x0, 0.0, context, cache, offset)
        else:
            entries = last["entries"]
        state.dit_cache = dit.push_cache(cache, entries)
        state.frame_offset += x0.shape[2]
        return x0

    def stream(self, prompt: str, num_chunks: int = 4, steps: int | None = None, seed: int = 0,
               progress: bool = False, schedule: FewStepSchedule | None = None,
               commit: str = "clean") -> Iterator[np.ndarray]:
        """Yield each chunk's frames (12, H, W, 3) uint8 as soon as it is decoded.

        Every draw (a chunk's noise, each step's re-noise) comes from ``portable_rng`` addressed by
        (seed, chunk, draw), so an app following the bundle's host_loop.json draws the same noise.
        The options are checked here, before the first chunk is asked for."""
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        check_commit(commit)
        schedule = schedule or FewStepSchedule(steps=steps or self.config.steps)
        return self._stream(prompt, num_chunks, seed, progress, schedule, commit)

    @torch.no_grad()
    def _stream(self, prompt: str, num_chunks: int, seed: int, progress: bool, schedule: FewStepSchedule,
                commit: str) -> Iterator[np.ndarray]:
        context = self.encode_prompt(prompt)
        state = self.start()
        for c in tqdm(range(num_chunks), desc=f"{self.config.name} chunks", unit="chunk", disable=not progress):
            noise = torch.from_numpy(portable_rng.normal(seed, c, 0, (1, *self.config.chunk_latent_shape)))
            renoise = lambda j, shape, c=c: torch.from_numpy(portable_rng.normal(seed, c, j, shape))  # noqa: E731
            x0 = self.denoise_chunk(noise, context, state, schedule, renoise=renoise, commit=commit)
            video, state.decoder_cache = self.decoder(x0, state.decoder_cache)
            yield to_uint8(video)

    def generate(self, prompt: str, num_chunks: int = 4, steps: int | None = None, seed: int = 0,
                 progress: bool = False, commit: str = "clean") -> np.ndarray:
        """The whole video (num_chunks * 12, H, W, 3) uint8."""
        return np.concatenate(list(self.stream(prompt, num_chunks, steps, seed, progress, commit=commit)), axis=0)


def load_pipeline(name: str, checkpoint: str | os.PathLike | None = None,
                  height: int | None = None, width: int | None = None,
                  dtype: torch.dtype | None = None) -> Pipeline:
    """Pipeline of a registered model (bundled weights) or a checkpoint folder.

    Weights load lazily in the checkpoint's dtype (``registry.load_stage``); ``dtype`` casts
    them (e.g. torch.float32 for an fp32 reference of an fp16 checkpoint)."""
    config, folder = resolve(name, checkpoint)
    if height or width:
        config = config.with_resolution(height or config.height, width or config.width)
        config.latent_hw  # validates
        config.dit.token_grid(config.stream.chunk_frames, *config.latent_hw)
    stages = {s: load_stage(config, folder, s, dtype=dtype) for s in ("text_encoder", "dit", "decoder")}
    return Pipeline(config, stages["text_encoder"], stages["dit"], stages["decoder"])
