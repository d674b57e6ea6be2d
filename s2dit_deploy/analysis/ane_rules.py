"""Apple Neural Engine placement rules, as data, each with its source.

Core ML decides placement on the device (``MLComputePlan`` is macOS-only), so these rules predict
it from the MIL program. They are conservative: an op is predicted on the ANE only if no rule
excludes it. Where the public record is thin the rule says so in ``note``.
"""

from __future__ import annotations

from dataclasses import dataclass

SRC_APPLE_TRANSFORMERS = (
    "Apple ML Research, 'Deploying Transformers on the Apple Neural Engine' (2022), "
    "https://machinelearning.apple.com/research/neural-engine-transformers ; "
    "https://github.com/apple/ml-ane-transformers"
)
SRC_HOLLANCE = ("https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md, "
                "https://github.com/hollance/neural-engine/blob/master/docs/is-model-using-ane.md")
SRC_COREMLTOOLS_OPT = (
    "coremltools 8/9 docs, Optimization > Quantization / Palettization overview ('per-block' granularity "
    "targets iOS18 GPU/CPU), https://apple.github.io/coremltools/docs-guides/source/opt-quantization-overview.html"
)
SRC_PROJECT = "tests/test_ane_residency.py (this repository's checks of each rule on converted programs)"
SRC_SD = "https://github.com/apple/ml-stable-diffusion (README: ANE-optimized attention, split_einsum)"


@dataclass(frozen=True)
class Rule:
    id: str
    description: str
    source: str
    note: str = ""


RULES: tuple[Rule, ...] = (
    Rule("fp32_compute", "op reads or writes an fp32 tensor; the ANE computes in fp16 (and int8)",
         f"{SRC_APPLE_TRANSFORMERS}; {SRC_PROJECT}"),
    Rule("integer_compute", "op computes on int32/int64/bool tensors (index math runs on the CPU)", SRC_HOLLANCE),
    Rule("rank_gt_4", "a tensor of rank > 4; the ANE works on 4-D (B, C, H, W) buffers, rank 5 is partly "
         "supported and rank > 5 not at all (counted as off-ANE here, conservatively)",
         f"{SRC_APPLE_TRANSFORMERS} (principle 1: (B, C, 1, S) layout); {SRC_HOLLANCE}"),
    Rule("dynamic_shape", "a tensor with a symbolic (runtime) dimension; the ANE compiles static shapes",
         f"{SRC_HOLLANCE}; {SRC_PROJECT}"),
    Rule("conv3d", "3-D convolution (5-D weight); no known ANE path, rewrite as conv2d", f"{SRC_HOLLANCE}; {SRC_PROJECT}"),
    Rule("gather", "gather / scatter / embedding lookup ops", SRC_HOLLANCE),
    Rule("blockwise_weight_quant", "a weight dequantized per block (block smaller than the input axis); "
         "rejected by the ANE compiler (CPU fallback, wrong ANE results reported on iPhone 16 Pro Max)",
         f"{SRC_COREMLTOOLS_OPT}; {SRC_PROJECT}"),
    Rule("oversized_dim", "a tensor dimension above MAX_DIM elements",
         SRC_HOLLANCE, note="the exact per-axis limits are undocumented; 16384 is the community-reported bound"),
    Rule("fused_sdpa", "fused scaled_dot_product_attention; split attention per head with matmul + softmax",
         f"{SRC_APPLE_TRANSFORMERS}; {SRC_SD}; {SRC_PROJECT}"),
    Rule("unsupported_op", "op type not in the ANE allowlist below", f"{SRC_HOLLANCE}; {SRC_APPLE_TRANSFORMERS}",
         note="allowlist = ops the cited sources show running on the ANE; unknown ops are predicted off-ANE"),
)
RULE_BY_ID = {r.id: r for r in RULES}

MAX_RANK = 4
MAX_DIM = 16384

# MIL op types predicted to run on the ANE (when no other rule excludes them).
ANE_OPS: frozenset[str] = frozenset({
    "conv", "conv_transpose", "matmul", "linear",
    "add", "sub", "mul", "real_div", "maximum", "minimum", "pow", "square", "sqrt", "rsqrt", "inverse",
    "exp", "log", "abs", "clip", "floor", "ceil", "round", "sign",
    "relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "sigmoid_hard", "tanh", "softmax", "softplus", "elu",
    "layer_norm", "instance_norm", "batch_norm", "l2_norm",
    "reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_l2_norm", "reduce_sum_square",
    "reshape", "transpose", "concat", "split", "slice_by_index", "slice_by_size", "expand_dims", "squeeze",
    "tile", "pad", "pixel_shuffle", "pixel_unshuffle", "space_to_depth", "depth_to_space",
    "upsample_nearest_neighbor", "upsample_bilinear", "resize_nearest_neighbor", "avg_pool", "max_pool",
    "select", "greater", "greater_equal", "less", "less_equal", "equal", "not_equal", "logical_not",
    "cast", "quantize", "dequantize",
})

# Weight / constant producers: evaluated at load time, not placed (not counted as ops).
CONST_OPS: frozenset[str] = frozenset({"const"})
CONST_PREFIX = "constexpr_"

GATHER_OPS: frozenset[str] = frozenset({
    "gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
})
SDPA_OPS: frozenset[str] = frozenset({"scaled_dot_product_attention"})

# Ops counted as data movement in the per-block transpose/reshape inventory.
LAYOUT_OPS: frozenset[str] = frozenset({"transpose", "reshape", "expand_dims", "squeeze"})


def rules_table() -> list[dict[str, str]]:
    return [{"id": r.id, "description": r.description.replace("MAX_DIM", str(MAX_DIM)), "source": r.source,
             "note": r.note} for r in RULES]
