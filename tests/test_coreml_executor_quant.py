"""Core ML reference executor: weight decompression (``constexpr_*``) and activation quantization.

The executor's numpy decompression is checked against coremltools' own
``materialized_val_inference``, and whole compressed programs (from ``coremltools.optimize.coreml``)
against torch running the same dequantized weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from s2dit_deploy.targets.coreml.executor import program_from_model

from .test_coreml_executor_helpers import IOS18, ct, fast_convert, mb, run_mil

R = np.random.default_rng(1)
X = R.standard_normal((3, 8)).astype(np.float32)


def _materialized(build):
    """coremltools' decompression of the constexpr op(s) built by ``build`` (an oracle)."""
    from coremltools.converters.mil.mil import Function

    with Function({}, opset_version=IOS18):
        var = build()
        return np.asarray(var.op.materialized_val_inference(), dtype=np.float32)


int8 = R.integers(-128, 127, size=(6, 8)).astype(np.int8)
int4 = R.integers(-8, 7, size=(6, 8)).astype(np.int8)
uint4 = R.integers(0, 15, size=(6, 8)).astype(np.uint8)
WEIGHT_CASES = {
    # per-channel int8 with offsets, as linear_quantize_weights(int8, per_channel)
    "blockwise_int8_per_channel": lambda: mb.constexpr_blockwise_shift_scale(
        data=int8, scale=R.uniform(0.01, 0.1, (6, 1)).astype(np.float32),
        offset=R.integers(-3, 3, (6, 1)).astype(np.int8)),
    # per-block (block 4 on the input axis) int4, fp16 scales
    "blockwise_int4_per_block": lambda: mb.constexpr_blockwise_shift_scale(
        data=int4_var(),
        scale=R.uniform(0.01, 0.1, (6, 2)).astype(np.float16)),
    # 4-bit palettization, one LUT per 2 output channels
    "lut_uint4_grouped": lambda: mb.constexpr_lut_to_dense(
        indices=uint4_var(), lut=R.standard_normal((3, 1, 16, 1)).astype(np.float32)),
    # vector palettization (2-vectors along axis 0)
    "lut_vector": lambda: mb.constexpr_lut_to_dense(
        indices=uint2_var((3, 8)), lut=R.standard_normal((1, 1, 4, 2)).astype(np.float16),
        vector_axis=0),
    "sparse": lambda: mb.constexpr_sparse_to_dense(
        nonzero_data=np.arange(1, 1 + int(MASK.sum()), dtype=np.float32), mask=mask_var()),
}
MASK = (R.uniform(size=(6, 8)) > 0.5).astype(np.uint8)


def _typed_const(val, dtype):
    from coremltools.converters.mil.mil import types

    return mb.const(val=val.astype(types.nptype_from_builtin(dtype)))


def int4_var():
    from coremltools.converters.mil.mil import types

    return _typed_const(int4, types.int4)


def uint4_var():
    from coremltools.converters.mil.mil import types

    return _typed_const(uint4, types.uint4)


def uint2_var(shape):
    from coremltools.converters.mil.mil import types

    return _typed_const(R.integers(0, 3, size=shape).astype(np.uint8), types.uint2)


def mask_var():
    from coremltools.converters.mil.mil import types

    return _typed_const(MASK, types.uint1)


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_constexpr_decompression_matches_coremltools(case, tmp_path):
    """decompressed weight W (6, 8): y = x @ W^T through a saved program vs coremltools' W."""
    build = WEIGHT_CASES[case]
    state = R.bit_generator.state
    w_ref = _materialized(build)
    R.bit_generator.state = state  # the program gets the very same random constants
    out = run_mil(lambda x: mb.matmul(x=x, y=mb.cast(x=build(), dtype="fp32") if _fp16(build) else build(),
                                      transpose_y=True), {"x": X}, tmp_path / "w.mlpackage")[0]
    np.testing.assert_allclose(out, X @ w_ref.T, rtol=1e-5, atol=1e-5)


def _fp16(build) -> bool:
    from coremltools.converters.mil.mil import Function, types

    state = R.bit_generator.state
    with Function({}, opset_version=IOS18):
        dtype = build().dtype
    R.bit_generator.state = state
    return dtype == types.fp16


def test_activation_quantize_dequantize(tmp_path):
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    scale = np.array([0.02, 0.03, 0.05], np.float32)
    zp = np.array([0, 3, -2], np.int8)

    def build(x):
        q = mb.quantize(input=x, scale=scale, zero_point=zp, axis=1, output_dtype="int8")
        return q, mb.dequantize(input=q, scale=scale, zero_point=zp, axis=1)

    q, dq = run_mil(build, {"x": x}, tmp_path / "q.mlpackage")
    s, z = scale.reshape(1, 3, 1), zp.reshape(1, 3, 1).astype(np.float32)
    q_ref = np.clip(np.round(x / s) + z, -128, 127)
    assert q.dtype.kind == "i"  # int8 inside; Core ML widens an int8 program output to int32
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_allclose(dq, (q_ref - z) * s, rtol=1e-6, atol=1e-7)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 96)
        self.b = torch.nn.Conv2d(96, 32, 1)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))  # (1, 5, 96)
        return self.b(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1)


def _dequantized_torch(model: _MLP, mlmodel) -> _MLP:
    """A torch copy of ``model`` whose weights are the compressed program's decompressed ones."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    spec = mlmodel.get_spec()
    prog = load_milproto(spec, spec.specificationVersion, mlmodel.weights_dir)
    found = {}
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_") and not any(c.op_type.startswith("constexpr_")
                                                           for c in op.outputs[0].child_ops):
            val = np.asarray(op.materialized_val_inference(), dtype=np.float32)
            found[val.shape[:2]] = val
    out = _MLP()
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        out.a.weight.copy_(torch.from_numpy(found[(96, 64)].reshape(96, 64)))
        out.b.weight.copy_(torch.from_numpy(found[(32, 96)].reshape(32, 96, 1, 1)))
    return out


@pytest.mark.parametrize("scheme", ["int8", "int4", "palettize4"])
def test_compressed_model_matches_torch_with_dequantized_weights(scheme):
    from coremltools.optimize import coreml as cto

    torch.manual_seed(0)
    model = _MLP().eval()
    x = torch.randn(1, 5, 64)
    ep = torch.export.export(model, (x,)).run_decompositions({})
    with fast_convert():
        mlmodel = ct.convert(ep, inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram",
                             minimum_deployment_target=IOS18, compute_precision=ct.precision.FLOAT32,
                             skip_model_load=True)
        if scheme == "palettize4":
            cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4, mode="kmeans",
                                                                              weight_threshold=64))
            compressed = cto.palettize_weights(mlmodel, cfg)
        else:
            cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype=scheme, granularity="per_channel", weight_threshold=64))
            compressed = cto.linear_quantize_weights(mlmodel, cfg)
    program = program_from_model(compressed)
    kinds = {t for t in program.op_types if t.startswith("constexpr_")}
    assert kinds, f"no constexpr op in the {scheme} program: {dict(program.op_types)}"
    (out,) = program.run({"x": x.numpy()}).values()
    with torch.no_grad():
        ref = _dequantized_torch(model, compressed)(x).numpy()
        float_ref = model(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    # and the compression itself is not a no-op
    assert np.abs(ref - float_ref).max() > 1e-6
