"""Core ML reference executor, op by op: tiny MIL programs saved as .mlpackage, loaded and run.

Ops with a coremltools ``value_inference`` are checked against it (the same op folded on const
inputs); the numpy-only ops (conv, norms, resampling, gelu, silu, ...) against torch. Every case
runs in fp32 (tight) and as an fp16 program (fp16 tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from s2dit_deploy.targets.coreml.executor import UnsupportedOpError
from s2dit_deploy.targets.coreml.mil_ops import supported_ops

from .test_coreml_executor_helpers import (
    assert_close_fp16,
    build_program,
    mb,
    run_mil,
    save_and_load,
    value_inference_oracle,
)

R = np.random.default_rng(0)


def rnd(*shape, lo=-2.0, hi=2.0):
    return R.uniform(lo, hi, size=shape).astype(np.float32)


def check(out, ref, fp16):
    if fp16:
        assert_close_fp16(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


# ---- ops checked against coremltools' own value_inference ------------------------------------
X, Y = rnd(2, 3, 4), rnd(2, 3, 4, lo=0.5, hi=2.0)
LW, LB, G4, B4 = rnd(5, 4), rnd(5), rnd(4), rnd(4)
BN = [rnd(3), rnd(3, lo=0.5), rnd(3), rnd(3)]
VI_CASES = {
    "add": (lambda x, y: mb.add(x=x, y=y), {"x": X, "y": Y}),
    "sub": (lambda x, y: mb.sub(x=x, y=y), {"x": X, "y": Y}),
    "mul": (lambda x, y: mb.mul(x=x, y=y), {"x": X, "y": Y}),
    "real_div": (lambda x, y: mb.real_div(x=x, y=y), {"x": X, "y": Y}),
    "pow": (lambda x, y: mb.pow(x=y, y=x), {"x": X, "y": Y}),
    "maximum_minimum": (lambda x, y: (mb.maximum(x=x, y=y), mb.minimum(x=x, y=y)), {"x": X, "y": Y}),
    "compare_select": (lambda x, y: (mb.select(cond=mb.logical_or(x=mb.less(x=x, y=y), y=mb.equal(x=x, y=y)),
                                               a=x, b=y), mb.cast(x=mb.greater(x=x, y=y), dtype="fp32")),
                       {"x": X, "y": Y}),
    "logical": (lambda x, y: mb.cast(x=mb.logical_and(x=mb.greater(x=x, y=0.0), y=mb.logical_not(
        x=mb.less(x=y, y=1.0))), dtype="fp32"), {"x": X, "y": Y}),
    "matmul": (lambda x, y: mb.matmul(x=x, y=y, transpose_y=True), {"x": X, "y": Y}),
    "linear": (lambda x: mb.linear(x=x, weight=LW, bias=LB), {"x": X}),
    "einsum": (lambda x, y: mb.einsum(equation="nchw,nwhu->nchu", values=(x, y)),
               {"x": rnd(1, 2, 3, 4), "y": rnd(1, 4, 3, 5)}),
    "unary": (lambda x: (mb.exp(x=x), mb.sqrt(x=mb.abs(x=x)), mb.rsqrt(x=mb.add(x=mb.square(x=x), y=0.1)),
                         mb.sin(x=x), mb.cos(x=x), mb.tanh(x=x), mb.relu(x=x)), {"x": X}),
    "clip_hard_sigmoid": (lambda x: (mb.clip(x=x, alpha=-0.5, beta=0.7), mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5),
                                     mb.thresholded_relu(x=x, alpha=0.3)), {"x": X}),
    "reshape_transpose": (lambda x: mb.transpose(x=mb.reshape(x=x, shape=[4, 6]), perm=[1, 0]), {"x": X}),
    "slice": (lambda x: (mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 3, 4], stride=[1, 1, 2]),
                         mb.slice_by_size(x=x, begin=[1, 0, 1], size=[1, 2, 3])), {"x": X}),
    "concat_split": (lambda x, y: mb.split(x=mb.concat(values=[x, y], axis=2), split_sizes=[3, 5], axis=2),
                     {"x": X, "y": Y}),
    "expand_squeeze_tile": (lambda x: mb.tile(x=mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]),
                                              reps=[1, 2, 1]), {"x": X}),
    "gather": (lambda x: (mb.gather(x=x, indices=np.array([2, 0], np.int32), axis=1),
                          mb.gather_along_axis(x=x, indices=np.zeros((2, 3, 2), np.int32), axis=2)), {"x": X}),
    "reduce": (lambda x: (mb.reduce_sum(x=x, axes=[1]), mb.reduce_mean(x=x, axes=[-1], keep_dims=True),
                          mb.reduce_max(x=x, axes=[0, 2])), {"x": X}),
    "softmax": (lambda x: mb.softmax(x=x, axis=-1), {"x": X}),
    "layer_norm": (lambda x: mb.layer_norm(x=x, axes=[-1], gamma=G4, beta=B4, epsilon=1e-5), {"x": X}),
    "fill_shape": (lambda x: mb.add(x=mb.fill(shape=mb.shape(x=x), value=2.5), y=x), {"x": X}),
    "band_part": (lambda x: mb.band_part(x=x, lower=1, upper=0), {"x": X}),
    "cast": (lambda x: mb.cast(x=mb.cast(x=mb.mul(x=x, y=3.0), dtype="int32"), dtype="fp32"), {"x": X}),
    "sdpa": (lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v),
             {"q": rnd(1, 2, 5, 8), "k": rnd(1, 2, 6, 8), "v": rnd(1, 2, 6, 8)}),
}


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", sorted(VI_CASES))
def test_op_matches_value_inference(case, fp16, tmp_path):
    build, inputs = VI_CASES[case]
    if fp16:  # fp16 programs take fp16-rounded inputs; the oracle sees the same values in fp32
        inputs = {k: v.astype(np.float16).astype(np.float32) for k, v in inputs.items()}
    refs = value_inference_oracle(build, inputs)
    outs = run_mil(build, inputs, tmp_path / "p.mlpackage", fp16=fp16)
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        check(out, ref, fp16)


# ---- numpy-only ops checked against torch ------------------------------------------------------
def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


W2, B2 = rnd(6, 2, 3, 3), rnd(6)
W3 = rnd(4, 1, 3, 3, 3)
WT = rnd(4, 3, 3, 3)
TORCH_CASES = {
    "conv2d_groups_stride_dil": (
        lambda x: mb.conv(x=x, weight=W2, bias=B2, strides=[2, 1], dilations=[1, 2], groups=2,
                          pad_type="custom", pad=[1, 0, 2, 1]),
        lambda x: F.conv2d(F.pad(x, (2, 1, 1, 0)), _t(W2), _t(B2), stride=(2, 1), dilation=(1, 2), groups=2),
        {"x": rnd(1, 4, 9, 10)}),
    "conv2d_same": (lambda x: mb.conv(x=x, weight=W2[:, :, :, :2], pad_type="same", groups=2),
                    lambda x: F.conv2d(F.pad(x, (0, 1, 1, 1)), _t(W2[:, :, :, :2]), groups=2),
                    {"x": rnd(2, 4, 7, 8)}),
    "conv1d": (lambda x: mb.conv(x=x, weight=W2[:, :, 0, :], strides=[2], pad_type="valid"),
               lambda x: F.conv1d(x, _t(W2[:, :, 0, :]), stride=2), {"x": rnd(1, 2, 11)}),
    "conv3d_depthwise": (lambda x: mb.conv(x=x, weight=W3, groups=4, pad_type="custom", pad=[2, 0, 1, 1, 1, 1]),
                         lambda x: F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), _t(W3), groups=4),
                         {"x": rnd(1, 4, 3, 5, 6)}),
    "conv_transpose": (lambda x: mb.conv_transpose(x=x, weight=WT, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]),
                       lambda x: F.conv_transpose2d(x, _t(WT), stride=2, padding=1), {"x": rnd(1, 4, 4, 5)}),
    "pools": (lambda x: (mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
                         mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[1, 1], pad_type="custom", pad=[1, 1, 1, 1])),
              lambda x: (F.avg_pool2d(x, 2), F.max_pool2d(x, 3, 1, 1)), {"x": rnd(1, 3, 6, 8)}),
    "batch_norm": (lambda x: mb.batch_norm(x=x, mean=BN[0], variance=BN[1], gamma=BN[2], beta=BN[3], epsilon=1e-3),
                   None, {"x": rnd(2, 3, 4, 5)}),
    "instance_norm": (lambda x: mb.instance_norm(x=x, gamma=np.full(3, 1.5, np.float32), beta=np.ones(3, np.float32)),
                      lambda x: F.instance_norm(x, weight=torch.full((3,), 1.5), bias=torch.ones(3), eps=1e-5),
                      {"x": rnd(2, 3, 4, 5)}),
    "upsample_nearest": (lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
                         lambda x: F.interpolate(x, scale_factor=(2, 3), mode="nearest"), {"x": rnd(1, 2, 3, 4)}),
    "pixel_shuffle": (lambda x: (mb.pixel_shuffle(x=x, upscale_factor=2),
                                 mb.pixel_unshuffle(x=x, downscale_factor=np.uint32(2))),
                      lambda x: (F.pixel_shuffle(x, 2), F.pixel_unshuffle(x, 2)), {"x": rnd(1, 8, 4, 6)}),
    "activations": (lambda x: (mb.gelu(x=x), mb.gelu(x=x, mode="TANH_APPROXIMATION"), mb.silu(x=x), mb.sigmoid(x=x)),
                    lambda x: (F.gelu(x), F.gelu(x, approximate="tanh"), F.silu(x), torch.sigmoid(x)),
                    {"x": rnd(3, 50, lo=-6, hi=6)}),
}


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_op_matches_torch(case, fp16, tmp_path):
    build, ref_fn, inputs = TORCH_CASES[case]
    if fp16:
        inputs = {k: v.astype(np.float16).astype(np.float32) for k, v in inputs.items()}
    if ref_fn is None:  # batch_norm: read its constants back from the built program
        op = next(o for o in build_program(build, inputs).functions["main"].operations if o.op_type == "batch_norm")
        c = {k: _t(op.inputs[k].val) for k in ("mean", "variance", "gamma", "beta")}
        refs = [F.batch_norm(_t(inputs["x"]), c["mean"], c["variance"], c["gamma"], c["beta"], eps=1e-3)]
    else:
        with torch.no_grad():
            r = ref_fn(**{k: _t(v) for k, v in inputs.items()})
        refs = list(r) if isinstance(r, tuple) else [r]
    outs = run_mil(build, inputs, tmp_path / "p.mlpackage", fp16=fp16)
    for out, ref in zip(outs, refs):
        assert out.shape == tuple(ref.shape)
        check(out, ref.numpy(), fp16)


# ---- precision semantics, errors, states -----------------------------------------------------
def test_fp16_program_rounds_after_every_op(tmp_path):
    """(x + 1e-4) - x: 0 when each op rounds to fp16 (x = 1), 1e-4 when ops stay fp32."""
    x = {"x": np.ones((1, 4), np.float32)}
    build = lambda x: mb.sub(x=mb.add(x=x, y=1e-4), y=x)
    out16 = run_mil(build, x, tmp_path / "a.mlpackage", fp16=True)[0]
    out32 = run_mil(build, x, tmp_path / "b.mlpackage", fp16=False)[0]
    assert np.all(out16 == 0)
    assert out32.dtype == np.float32 and np.allclose(out32, 1e-4, rtol=1e-3)


def test_unknown_op_raises_with_type_and_name(tmp_path):
    build = lambda x: mb.local_response_norm(x=x, size=3, name="lrn_under_test")
    prog = build_program(build, {"x": rnd(1, 4, 3, 3)})
    with pytest.raises(UnsupportedOpError) as err:
        save_and_load(prog, tmp_path / "p.mlpackage")
    msg = str(err.value)
    assert "local_response_norm" in msg and "lrn_under_test" in msg and "issue" in msg and "conv" in msg


def test_supported_ops_cover_the_project_op_set():
    needed = {"const", "cast", "add", "sub", "mul", "real_div", "pow", "maximum", "minimum", "matmul", "linear",
              "conv", "conv_transpose", "reshape", "transpose", "slice_by_index", "slice_by_size", "concat",
              "split", "expand_dims", "squeeze", "tile", "gather", "gather_along_axis", "reduce_sum",
              "reduce_mean", "reduce_max", "softmax", "layer_norm", "batch_norm", "instance_norm", "relu",
              "gelu", "silu", "sigmoid", "tanh", "sigmoid_hard", "thresholded_relu", "exp", "sqrt", "rsqrt",
              "square", "sin", "cos", "einsum", "upsample_nearest_neighbor", "pixel_shuffle", "select", "clip",
              "less", "greater", "equal", "logical_and", "fill", "shape", "band_part",
              "scaled_dot_product_attention", "read_state", "coreml_update_state",
              "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense",
              "constexpr_sparse_to_dense", "quantize", "dequantize"}
    assert needed <= set(supported_ops())


def test_state_read_write_round_trip(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil.mil import Function, Program, types

    prog = Program()
    holders = {"acc": mb.state_tensor_placeholder(shape=(2, 3), dtype=types.fp16),
               "x": mb.placeholder(shape=(2, 3), dtype=types.fp16)}
    with Function(holders, opset_version=ct.target.iOS18) as f:
        new = mb.add(x=mb.read_state(input=f.inputs["acc"]), y=f.inputs["x"])
        mb.coreml_update_state(state=f.inputs["acc"], value=new)
        f.set_outputs([mb.mul(x=new, y=np.float16(2.0), name="doubled")])
        prog.add_function("main", f)
    program = save_and_load(prog, tmp_path / "s.mlpackage")
    assert program.state_names == ["acc"] and program.input_names == ["x"]
    with pytest.raises(ValueError, match="stateful"):
        program.run({"x": np.ones((2, 3))})
    state = program.new_state()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out1 = program.run({"x": x}, state=state)["doubled"]
    out2 = program.run({"x": x}, state=state)["doubled"]
    np.testing.assert_array_equal(state.read_state("acc"), 2 * x)
    np.testing.assert_array_equal(out1, 2 * x)
    np.testing.assert_array_equal(out2, 4 * x)
    state.write_state("acc", np.full((2, 3), 10.0))
    np.testing.assert_array_equal(program.run({"x": x}, state=state)["doubled"], 2 * (10 + x))
