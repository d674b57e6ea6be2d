"""Gaussian noise any app can reproduce bit for bit: SplitMix64 counters + Box-Muller, in numpy.

Why our own generator: the streaming loop draws the chunk noise and the re-noise of every step,
and an app on a phone must draw exactly the same numbers to produce the frames the toolchain
validated. ``torch.Generator`` (MT19937 plus torch's own normal transform) has no port in Swift or
Kotlin; this counter-based generator is a dozen lines in any language (the bundle's
``host_loop.json`` states it) and, being counter-based, each draw is addressed by (seed, chunk,
draw) instead of by how many numbers were drawn before it.

This file imports only numpy: it is copied verbatim into every bundle as ``host/portable_rng.py``
for the standalone reference host.

Algorithm (version 1), all integer arithmetic modulo 2**64:
    mix(z)   = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
    key      = mix(seed * GOLDEN ^ mix(stream + 1)),  stream = chunk * 256 + draw
    u64[i]   = mix(key + (i + 1) * GOLDEN)                         (i = 0 .. 2 * ceil(n / 2) - 1)
    u[i]     = ((u64[i] >> 11) + 0.5) / 2**53                      (float64 in (0, 1))
    z[2j]    = sqrt(-2 ln u[2j]) * cos(2 pi u[2j+1]),  z[2j+1] = ... * sin(2 pi u[2j+1])
    noise    = float32(z[:n]) reshaped row-major to the requested shape
Draw 0 of a chunk is its initial noise; draw j >= 1 is the re-noise before denoising step j.
"""

from __future__ import annotations

import numpy as np

ALGORITHM = "splitmix64-box-muller-v1"
GOLDEN = 0x9E3779B97F4A7C15
DRAWS_PER_CHUNK = 256  # stream = chunk * 256 + draw: up to 255 re-noise draws per chunk
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def stream_id(chunk: int, draw: int) -> int:
    if not 0 <= draw < DRAWS_PER_CHUNK:
        raise ValueError(f"draw must be in 0..{DRAWS_PER_CHUNK - 1}, got {draw}")
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    return chunk * DRAWS_PER_CHUNK + draw


def normal(seed: int, chunk: int, draw: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 noise of ``shape`` for draw ``draw`` of chunk ``chunk``."""
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in 0..2**64-1, got {seed}")
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
        seed64 = np.array([seed], dtype=np.uint64)
        stream = np.array([stream_id(chunk, draw) + 1], dtype=np.uint64)
        key = _mix((seed64 * np.uint64(GOLDEN)) ^ _mix(stream))
        count = 2 * ((n + 1) // 2)
        counters = np.arange(1, count + 1, dtype=np.uint64)
        bits = _mix(key + counters * np.uint64(GOLDEN))
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    r = np.sqrt(-2.0 * np.log(u[0::2]))
    theta = 2.0 * np.pi * u[1::2]
    z = np.empty(count, dtype=np.float64)
    z[0::2] = r * np.cos(theta)
    z[1::2] = r * np.sin(theta)
    return z[:n].astype(np.float32).reshape(shape)
