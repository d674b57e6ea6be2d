"""Options of the ``coreai`` target, as plain data (no coreai import), for checks and --help-options."""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("fp16", "fp32")
MINIMUM_OS = ("27",)


@dataclass(frozen=True)
class CoreAIOptions:
    """Conversion switches of ``CoreAITarget.compile`` (``--option precision=fp32``)."""

    rewrite: bool = field(default=True, metadata={
        "doc": "apply the Neural Engine rewrites (channels-first 1x1 convs, split heads, rank <= 4, "
               "fp16-safe LCHA state scales), as for coreml"})
    rewrite_decoder: bool = field(default=False, metadata={
        "doc": "also rewrite the decoder for the Neural Engine (frames as batch, per-tap conv2d). Off by default: "
               "the decoder runs on the GPU in the paper's deployment (Table A3), coreai-opt cannot reach the "
               "rewrite's per-tap weights, and the stock decoder ran 2.1x faster on the Linux runtime"})
    split_heads: bool = field(default=True, metadata={"doc": "split attention into per-head matmuls (ANE rewrite)"})
    fold_io: bool = field(default=True, metadata={
        "doc": "dit_step takes context and the RoPE tables in host layout and transposes them in the graph"})
    precision: str = field(default="fp16", metadata={
        "doc": "dtype of the converted program: fp16 is what the Neural Engine computes (and what the Linux "
               "runtime then computes too); fp32 is a host-exact program", "choices": PRECISIONS})
    minimum_os: str = field(default="27", metadata={
        "doc": "minimum iOS / macOS version of the .aimodel", "choices": MINIMUM_OS})
    chunks: int = field(default=0, metadata={
        "doc": "split dit_step into this many chained programs along its groups; 0 = as few as keep each "
               "chunk under chunk_mb of fp16 weights"})
    chunk_mb: float = field(default=1000.0, metadata={
        "doc": "largest dit_step chunk's fp16 weights in MB when chunks=0 (device load memory, as coreml)"})

    def __post_init__(self) -> None:
        from s2dit_deploy.targets.option_checks import require_at_least

        require_at_least(self, "chunks", 0)
        if not self.chunk_mb > 0:
            raise ValueError(f"chunk_mb must be > 0, got {self.chunk_mb!r}")

    def ane(self):
        from s2dit_deploy.rewrites import AneOptions

        return AneOptions(split_heads=self.split_heads, fold_io=self.fold_io)
