"""Core ML reference executor: no silent wrong answers (issue 16 item 18).

Each fix is checked against numpy written out by hand here (not the executor, not coremltools'
value_inference); attribute values the executor does not implement must raise
``UnsupportedOpError`` naming the op and the attribute.
"""

from __future__ import annotations

import numpy as np
import pytest
from s2dit_deploy.errors import EXIT_UNAVAILABLE, ToolchainUnavailable
from s2dit_deploy.targets.coreml.executor import OpExecutionError, UnsupportedOpError

from .test_coreml_executor_helpers import IOS18, build_program, ct, mb, run_mil, save_and_load

R = np.random.default_rng(1)


def rnd(*shape):
    return R.uniform(-3, 3, size=shape).astype(np.float32)


def test_unsupported_op_error_is_toolchain_unavailable():
    assert issubclass(UnsupportedOpError, ToolchainUnavailable)
    assert UnsupportedOpError("x", "y").exit_code == EXIT_UNAVAILABLE


def test_concat_interleave(tmp_path):
    a, b = rnd(2, 3), rnd(2, 3)
    out = run_mil(lambda a, b: mb.concat(values=[a, b], axis=1, interleave=True), {"a": a, "b": b},
                  tmp_path / "p.mlpackage")[0]
    ref = np.array([[a[r, 0], b[r, 0], a[r, 1], b[r, 1], a[r, 2], b[r, 2]] for r in range(2)], np.float32)
    np.testing.assert_array_equal(out, ref)
    out0 = run_mil(lambda a, b: mb.concat(values=[a, b], axis=0, interleave=True), {"a": a, "b": b},
                   tmp_path / "q.mlpackage")[0]
    np.testing.assert_array_equal(out0, np.array([a[0], b[0], a[1], b[1]]))


def test_upsample_nearest_fractional_scale(tmp_path):
    x = np.arange(2 * 5, dtype=np.float32).reshape(1, 1, 2, 5)
    out = run_mil(lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=1.5, scale_factor_width=1.3),
                  {"x": x}, tmp_path / "p.mlpackage")[0]
    # out 3 x 6; rows floor(i * 2 / 3) = 0, 0, 1; columns floor(j * 5 / 6) = 0, 0, 1, 2, 3, 4
    # (floor(j / 1.3) would repeat column 3 and drop column 4)
    rows, cols = [0, 0, 1], [0, 0, 1, 2, 3, 4]
    ref = np.array([[x[0, 0, r, c] for c in cols] for r in rows], np.float32)[None, None]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("axis,shape", [(0, (1, 24)), (-3, (1, 24)), (3, (24, 1)), (-1, (6, 4))])
def test_flatten2d_axis_boundaries(axis, shape, tmp_path):
    x = rnd(2, 3, 4)
    out = run_mil(lambda x: mb.flatten2d(x=x, axis=axis), {"x": x}, tmp_path / "p.mlpackage")[0]
    assert out.shape == shape
    np.testing.assert_array_equal(out.reshape(-1), x.reshape(-1))


def test_range_1d_above_one_megabyte(tmp_path):
    n = 300_000  # 1.2 MB of fp32: coremltools' value_inference refuses to fold it
    x = np.array([float(n)], np.float32)
    out = run_mil(lambda x: mb.range_1d(start=0.0, end=mb.squeeze(x=x), step=1.0), {"x": x},
                  tmp_path / "p.mlpackage")[0]
    assert out.shape == (n,) and out[0] == 0 and out[-1] == n - 1 and out[12345] == 12345


def _scatter(mode, indices, tmp_path, **kw):
    data, upd = np.ones((2, 3), np.float32), np.full((2, 2), 5.0, np.float32)
    build = lambda d, u: mb.scatter_along_axis(data=d, indices=indices, updates=u, axis=1, mode=mode, **kw)
    return run_mil(build, {"d": data, "u": upd}, tmp_path / f"{mode}.mlpackage")[0]


def test_scatter_along_axis_modes(tmp_path):
    idx = np.array([[0, 2], [1, 1]], np.int32)
    np.testing.assert_array_equal(_scatter("update", idx, tmp_path), [[5, 1, 5], [1, 5, 1]])
    np.testing.assert_array_equal(_scatter("add", idx, tmp_path), [[6, 1, 6], [1, 11, 1]])  # duplicates add up
    np.testing.assert_array_equal(_scatter("mul", idx, tmp_path), [[5, 1, 5], [1, 25, 1]])


def test_scatter_along_axis_negative_index_raises(tmp_path):
    """iOS 17+ spec: indices are in [0, D); a negative index is out of bound (no wrap-around)."""
    idx = np.array([[0, -1], [1, 1]], np.int32)
    with pytest.raises(OpExecutionError, match=r"scatter_along_axis.*out of range \[0, 3\)"):
        _scatter("update", idx, tmp_path)


def test_gather_along_axis_out_of_range_raises(tmp_path):
    x = rnd(2, 3)
    build = lambda x: mb.gather_along_axis(x=x, indices=np.array([[0], [-1]], np.int32), axis=1)
    with pytest.raises(OpExecutionError, match="out of range"):
        run_mil(build, {"x": x}, tmp_path / "p.mlpackage")


def test_cumsum_exclusive_reverse(tmp_path):
    x = np.array([[1, 2, 3, 4]], np.float32)
    outs = run_mil(lambda x: (mb.cumsum(x=x, axis=1, exclusive=True), mb.cumsum(x=x, axis=1, reverse=True),
                              mb.cumsum(x=x, axis=1, exclusive=True, reverse=True)), {"x": x}, tmp_path / "p.mlpackage")
    np.testing.assert_array_equal(outs[0], [[0, 1, 3, 6]])
    np.testing.assert_array_equal(outs[1], [[10, 9, 7, 4]])
    np.testing.assert_array_equal(outs[2], [[9, 7, 4, 0]])


def _flexible_program(tmp_path, input_shape):
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    from .test_coreml_executor_helpers import fast_convert

    prog = Program()
    with Function({"x": mb.placeholder(shape=(1, get_new_symbol()), dtype=types.fp32)}, opset_version=IOS18) as f:
        y = mb.mul(x=mb.add(x=f.inputs["x"], y=1.0), y=2.0, name="y")
        f.set_outputs([y, mb.reshape(x=y, shape=[-1, 1], name="col")])
        prog.add_function("main", f)
    with fast_convert():
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                           inputs=[ct.TensorType(name="x", shape=input_shape)],
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(tmp_path / "f.mlpackage"))
    from s2dit_deploy.targets.coreml.executor import load_program

    return load_program(tmp_path / "f.mlpackage")


@pytest.mark.parametrize("kind", ["range", "enumerated"])
def test_flexible_shape_program_runs_for_the_shapes_fed(kind, tmp_path):
    from s2dit_deploy.errors import InputError

    shape = (ct.Shape((1, ct.RangeDim(1, 16, default=4))) if kind == "range"
             else ct.EnumeratedShapes(shapes=[(1, 3), (1, 4), (1, 7)], default=(1, 4)))
    program = _flexible_program(tmp_path, shape)
    for n in (3, 7):
        x = rnd(1, n)
        out = program.run({"x": x})
        np.testing.assert_allclose(out["y"], (x + 1) * 2, rtol=1e-6)  # hand-computed
        np.testing.assert_allclose(out["col"], ((x + 1) * 2).reshape(n, 1), rtol=1e-6)
    with pytest.raises(InputError, match="'x'"):
        program.run({"x": rnd(1, 17 if kind == "range" else 5)})


# ---- attribute values the executor does not implement: rejected at load time, by name -------------
X4 = rnd(1, 2, 5, 5)
REJECTED = {
    "avg_pool.ceil_mode": (lambda x: mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid",
                                                 ceil_mode=True), {"x": X4}, "ceil_mode"),
    "max_pool.ceil_mode": (lambda x: mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid",
                                                 ceil_mode=True), {"x": X4}, "ceil_mode"),
    "topk.return_indices": (lambda x: mb.topk(x=x, k=2, axis=-1, return_indices=False), {"x": X4}, "return_indices"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_unimplemented_attribute_raises(case, tmp_path):
    build, inputs, attr = REJECTED[case]
    op_type = case.split(".")[0]
    with pytest.raises(UnsupportedOpError) as err:
        save_and_load(build_program(build, inputs), tmp_path / "p.mlpackage")
    msg = str(err.value)
    assert op_type in msg and attr in msg and err.value.attribute.startswith(attr)


def test_conv_transpose_with_flexible_shape_is_rejected(tmp_path):
    """conv_transpose crops to its declared output size, which a flexible program leaves symbolic."""
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    from .test_coreml_executor_helpers import fast_convert

    prog = Program()
    w = rnd(2, 2, 3, 3)
    with Function({"x": mb.placeholder(shape=(1, 2, 4, get_new_symbol()), dtype=types.fp32)},
                  opset_version=IOS18) as f:
        f.set_outputs([mb.conv_transpose(x=f.inputs["x"], weight=w, pad_type="same", strides=[2, 2])])
        prog.add_function("main", f)
    with fast_convert():
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                           inputs=[ct.TensorType(name="x", shape=(1, 2, 4, ct.RangeDim(2, 8, default=4)))],
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(tmp_path / "f.mlpackage"))
    from s2dit_deploy.targets.coreml.executor import load_program

    with pytest.raises(UnsupportedOpError, match="conv_transpose.*flexible output shape"):
        load_program(tmp_path / "f.mlpackage")
