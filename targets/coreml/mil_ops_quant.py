"""Weight decompression (``constexpr_*``) and activation ``quantize`` / ``dequantize`` in numpy.

The iOS 18 compression ops that ``coremltools.optimize.coreml`` emits (blockwise shift-scale,
LUT / palettization, sparse masks), the iOS 16 affine dequantization and ``constexpr_cast`` are
written out here from the MIL op reference, so that the executor's decompression is independent
of coremltools' (the tests compare the two). Rarer forms (iOS 16 packed LUT / sparse masks, the
two-output sparse variants) use coremltools' own ``materialized_val_inference``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .mil_ops import via_materialized_val_inference, via_value_inference


def _f32(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def _block_repeat(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter (same rank as the data) up to the data's shape."""
    param = np.asarray(param)
    for axis, (p, d) in enumerate(zip(param.shape, shape)):
        if p != d:
            param = np.repeat(param, d // p, axis=axis)
    return param


def _along_axis(param: Any, ndim: int, axis: int | None) -> np.ndarray:
    """A scalar or a vector along ``axis`` reshaped to broadcast against a rank-``ndim`` tensor."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    if param.ndim == ndim:
        return param
    shape = [1] * ndim
    shape[int(axis) % ndim] = -1
    return param.reshape(shape)


def constexpr_affine_dequantize(op: Any, args: dict[str, Any]) -> np.ndarray:
    """iOS16: ``scale * (quantized_data - zero_point)`` with per-tensor or per-``axis`` params."""
    q = args["quantized_data"]
    axis = int(args["axis"])
    zp = _along_axis(args["zero_point"], q.ndim, axis)
    scale = _along_axis(args["scale"], q.ndim, axis)
    return _f32(scale) * (q.astype(np.float32) - zp.astype(np.float32))


def constexpr_blockwise_shift_scale(op: Any, args: dict[str, Any]) -> np.ndarray:
    """iOS18: ``scale[block] * (data - offset[block])``; block size = data.shape / scale.shape."""
    data = args["data"].astype(np.float32)
    scale = _block_repeat(_f32(args["scale"]), data.shape)
    if args.get("offset") is not None:
        data = data - _block_repeat(_f32(args["offset"]), data.shape)
    return scale * data


def constexpr_lut_to_dense(op: Any, args: dict[str, Any]) -> np.ndarray:
    """iOS18 palettization: per-block look-up tables (``lut`` rank = indices rank + 2)."""
    if "shape" in op._input_vars:  # iOS16 form: packed uint8 indices and a flat LUT
        return via_materialized_val_inference(op, args)
    indices = np.asarray(args["indices"]).astype(np.int64)
    lut = np.asarray(args["lut"])
    k = indices.ndim
    # table coordinates of every element: element index // block size on each axis
    grids = np.meshgrid(*(np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:k])),
                        indexing="ij")
    gathered = lut[(*grids, indices)]  # (*indices.shape, vector_size)
    if lut.shape[-1] == 1:
        return gathered[..., 0]
    axis = int(args["vector_axis"]) % k
    moved = np.moveaxis(gathered, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= lut.shape[-1]
    return moved.reshape(shape)


def constexpr_sparse_to_dense(op: Any, args: dict[str, Any]) -> np.ndarray:
    """iOS18: scatter ``nonzero_data`` (row-major order) into the positions where ``mask`` is 1."""
    if "shape" in op._input_vars:  # iOS16 form: bit-packed uint8 mask and an explicit shape
        return via_materialized_val_inference(op, args)
    mask = np.asarray(args["mask"])
    data = np.asarray(args["nonzero_data"])
    out = np.zeros(mask.shape, dtype=data.dtype)
    out[mask != 0] = data
    return out


def constexpr_cast(op: Any, args: dict[str, Any]) -> np.ndarray:
    return np.asarray(args["source_val"])  # the executor casts to the declared output dtype


def dequantize(op: Any, args: dict[str, Any]) -> np.ndarray:
    """iOS17 activation dequantization: ``scale * (input - zero_point)`` (per tensor or per axis)."""
    x = np.asarray(args["input"]).astype(np.float32)
    axis = None if args.get("axis") is None else int(args["axis"])
    if args.get("zero_point") is not None:
        x = x - _along_axis(args["zero_point"], x.ndim, axis).astype(np.float32)
    return x * _along_axis(_f32(args["scale"]), x.ndim, axis)


OPS = {
    "constexpr_affine_dequantize": constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": constexpr_lut_to_dense,
    "constexpr_sparse_to_dense": constexpr_sparse_to_dense,
    "constexpr_cast": constexpr_cast,
    "constexpr_lut_to_sparse": via_materialized_val_inference,
    "constexpr_sparse_blockwise_shift_scale": via_materialized_val_inference,
    "quantize": via_value_inference,
    "dequantize": dequantize,
}
