"""Options of the ``coreml`` target, as plain data (no coremltools import), for checks and --help-options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CoreMLOptions:
    """Conversion switches; ``from_dict`` accepts CLI strings (``--option fold_schedule=1,0.5,0``)."""

    rewrite: bool = field(default=True, metadata={
        "doc": "apply the Neural Engine rewrites (channels-first layout, split heads, folded schedule)"})
    split_heads: bool = field(default=True, metadata={"doc": "split attention into per-head matmuls (ANE rewrite)"})
    fold_io: bool = field(default=True, metadata={
        "doc": "dit_step takes context and the RoPE tables in host layout and transposes them in the graph"})
    fold_schedule: tuple[float, ...] | None = field(default=None, metadata={
        "doc": "comma-separated timesteps to fold into a one-hot step selector (e.g. 1,0.5,0); none = off"})
    precision: str = field(default="fp16", metadata={
        "doc": "compute precision of the ML program", "choices": ("fp16", "fp32")})
    io_dtype: str = field(default="fp16", metadata={
        "doc": "dtype of the model's inputs/outputs (fp16 avoids boundary casts on the ANE)",
        "choices": ("fp16", "fp32")})
    deployment_target: str = field(default="iOS18", metadata={
        "doc": "minimum deployment target (coremltools ct.target name)", "choices": ("iOS17", "iOS18")})
    compute_units: str = field(default="ALL", metadata={
        "doc": "Core ML compute units", "choices": ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")})

    chunks: int = field(default=0, metadata={
        "doc": "split dit_step into this many chained programs along its groups (ml-stable-diffusion's "
               "--chunk-unet); 0 = as few as keep each chunk under chunk_mb of fp16 weights"})
    chunk_mb: float = field(default=1000.0, metadata={
        "doc": "largest chunk's fp16 weights in MB when chunks=0 (a weight.bin over 2 GiB fails to load "
               "on the device; ml-stable-diffusion keeps chunks near 1 GB)"})

    def __post_init__(self) -> None:
        from s2dit_deploy.targets.option_checks import require_at_least

        require_at_least(self, "chunks", 0)
        if not self.chunk_mb > 0:
            raise ValueError(f"chunk_mb must be > 0, got {self.chunk_mb!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CoreMLOptions:
        from s2dit_deploy.targets.base import parse_options

        return parse_options(cls, d, "coreml")

    def ane(self):
        from s2dit_deploy.rewrites import AneOptions

        return AneOptions(split_heads=self.split_heads, fold_schedule=self.fold_schedule, fold_io=self.fold_io)
