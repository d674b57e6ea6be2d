"""Options of the ``executorch-qnn`` target, as plain data (no ExecuTorch / QNN import).

``precision`` is the compute precision of float ops (HTP: fp16). Quantization comes from
``--quant``: a QuantPlan, or one of ``QUANT_PRESETS`` (PT2E per-channel presets the target
builds itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from s2dit_deploy.targets.option_checks import canonical_soc, require_at_least

# --quant names resolved by the QNN targets themselves (see lower.PRECISIONS)
QUANT_PRESETS = ("8a8w", "16a8w", "16a4w", "8a4w", "16a16w")
ACT_OBSERVERS = ("minmax", "moving_average", "histogram")


@dataclass(frozen=True)
class QnnOptions:
    """What ``QnnTarget.compile`` takes."""

    QUANT_PRESETS = QUANT_PRESETS  # not a field (no annotation): read by base.quant_presets

    soc: str = field(default="SM8750", metadata={
        "doc": "Snapdragon SoC to build for (SM8550, SM8650, SM8750 = Galaxy S25, SM8850)"})
    precision: str = field(default="fp16", metadata={
        "doc": "compute precision of float ops on HTP; quantize with --quant (8a8w, 16a8w, ... or a plan)",
        "choices": ("fp16",), "hint": "quantization comes from --quant (8a8w, 16a8w, 16a4w, 8a4w, 16a16w or a plan)"})
    profile: bool = field(default=False, metadata={
        "doc": "compile with QNN detailed profiling so bench reports HTP emulator events"})
    act_observer: str = field(default="minmax", metadata={
        "doc": "activation observer when quantizing (minmax; QNN's default moving_average; histogram)",
        "choices": ACT_OBSERVERS})
    calibration_samples: int = field(default=0, metadata={
        "doc": "cap on recorded calibration calls per stage (0 = all)"})
    shards: int = field(default=0, metadata={
        "doc": "split dit_step into this many chained .pte files along its groups (ExecuTorch's Qualcomm "
               "num_sharding); 0 = as few as keep each shard's weights under shard_mb"})
    shard_mb: float = field(default=1536.0, metadata={
        "doc": "largest shard's weights in MB at the stored width (fp16 2 bytes, 8-bit 1, 4-bit 0.5) when "
               "shards=0: the context binary is embedded in the .pte (a 2 GB flatbuffer) and an HTP "
               "context holds about 4 GB"})

    def __post_init__(self):
        canonical_soc(self)
        require_at_least(self, "calibration_samples", 0)
        require_at_least(self, "shards", 0)
        if not self.shard_mb > 0:
            raise ValueError(f"shard_mb must be > 0, got {self.shard_mb!r}")
