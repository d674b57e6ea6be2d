"""Numpy implementations of MIL neural-network ops that coremltools gives no value_inference:
convolution (1d/2d/3d, groups, strides, dilations, pad types), transposed convolution, pooling,
batch / instance norm and resampling. Semantics follow the MIL op reference (coremltools
``mil.ops.defs.iOS15.conv`` etc.); all arithmetic is float32 on float32 inputs.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np


def _ints(v: Any, n: int, default: int) -> list[int]:
    if v is None:
        return [default] * n
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _pads(pad_type: str, pad: Any, in_sizes: list[int], eff_kernel: list[int], strides: list[int]
          ) -> list[tuple[int, int]]:
    """(begin, end) pad per spatial axis for MIL's ``pad_type`` (valid / same / same_lower / custom)."""
    n = len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = _ints(pad, 2 * n, 0)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s in zip(in_sizes, eff_kernel, strides):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise ValueError(f"unknown pad_type {pad_type!r}")


def conv(op: Any, args: dict[str, Any]) -> np.ndarray:
    """MIL ``conv``: x (N, C, *S), weight (F, C / groups, *K), optional bias (F,)."""
    x = np.asarray(args["x"], dtype=np.float32)
    w = np.asarray(args["weight"], dtype=np.float32)
    n_sp = x.ndim - 2
    strides = _ints(args.get("strides"), n_sp, 1)
    dil = _ints(args.get("dilations"), n_sp, 1)
    groups = int(args.get("groups") if args.get("groups") is not None else 1)
    kernel = list(w.shape[2:])
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    pads = _pads(str(args.get("pad_type") or "valid"), args.get("pad"), list(x.shape[2:]), eff, strides)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    out_sp = [(xp.shape[2 + i] - eff[i]) // strides[i] + 1 for i in range(n_sp)]
    n, c = x.shape[:2]
    f = w.shape[0]
    cg, fg = c // groups, f // groups
    # kernel offsets first, each (G, Fg, Cg) slice contiguous: numpy's matmul only uses BLAS then
    wk_all = np.ascontiguousarray(np.moveaxis(w.reshape(groups, fg, cg, *kernel), [0, 1, 2], [-3, -2, -1]))
    acc = np.zeros((n, groups, fg, int(np.prod(out_sp))), dtype=np.float32)
    depthwise = cg == 1 and fg == 1
    for kidx in itertools.product(*(range(k) for k in kernel)):
        sl = tuple(
            slice(kidx[i] * dil[i], kidx[i] * dil[i] + (out_sp[i] - 1) * strides[i] + 1, strides[i])
            for i in range(n_sp)
        )
        xs = np.ascontiguousarray(xp[(slice(None), slice(None), *sl)]).reshape(n, groups, cg, -1)
        wk = wk_all[kidx]  # (G, Fg, Cg)
        if depthwise:
            acc += wk[None, :, :, :] * xs
        else:
            acc += np.matmul(wk[None], xs)
    out = acc.reshape(n, f, *out_sp)
    if args.get("bias") is not None:
        out += np.asarray(args["bias"], dtype=np.float32).reshape(1, f, *([1] * n_sp))
    return out


def conv_transpose(op: Any, args: dict[str, Any]) -> np.ndarray:
    """MIL ``conv_transpose``: x (N, C, *S), weight (C, F / groups, *K); output_shape optional."""
    x = np.asarray(args["x"], dtype=np.float32)
    w = np.asarray(args["weight"], dtype=np.float32)
    n_sp = x.ndim - 2
    strides = _ints(args.get("strides"), n_sp, 1)
    dil = _ints(args.get("dilations"), n_sp, 1)
    groups = int(args.get("groups") if args.get("groups") is not None else 1)
    kernel = list(w.shape[2:])
    n, c = x.shape[:2]
    cg, fg = c // groups, w.shape[1]
    in_sp = list(x.shape[2:])
    full = [(in_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(n_sp)]
    target = [int(s) for s in op.outputs[0].shape[2:]]
    pad_type = str(args.get("pad_type") or "valid")
    if pad_type == "custom":
        p = _ints(args.get("pad"), 2 * n_sp, 0)
        begins = [p[2 * i] for i in range(n_sp)]
    elif pad_type == "valid":
        begins = [0] * n_sp
    else:  # same / same_lower: crop the full output to the static output size
        begins = [(fu - t) // 2 if pad_type == "same" else fu - t - (fu - t) // 2
                  for fu, t in zip(full, target)]
    buf_sp = [max(full[i], begins[i] + target[i]) for i in range(n_sp)]
    buf = np.zeros((n, groups, fg, *buf_sp), dtype=np.float32)
    xg = x.reshape(n, groups, cg, -1)
    wk_all = np.ascontiguousarray(np.moveaxis(w.reshape(groups, cg, fg, *kernel), [0, 2, 1], [-3, -2, -1]))
    for kidx in itertools.product(*(range(k) for k in kernel)):
        wk = wk_all[kidx]  # (G, Fg, Cg)
        contrib = np.matmul(wk[None], xg).reshape(n, groups, fg, *in_sp)
        sl = tuple(
            slice(kidx[i] * dil[i], kidx[i] * dil[i] + (in_sp[i] - 1) * strides[i] + 1, strides[i])
            for i in range(n_sp)
        )
        buf[(slice(None), slice(None), slice(None), *sl)] += contrib
    crop = tuple(slice(b, b + t) for b, t in zip(begins, target))
    out = buf[(slice(None), slice(None), slice(None), *crop)].reshape(n, groups * fg, *target)
    if args.get("bias") is not None:
        out = out + np.asarray(args["bias"], dtype=np.float32).reshape(1, -1, *([1] * n_sp))
    return out


def _pool(op: Any, args: dict[str, Any], kind: str) -> np.ndarray:
    x = np.asarray(args["x"], dtype=np.float32)
    n_sp = x.ndim - 2
    kernel = _ints(args["kernel_sizes"], n_sp, 1)
    strides = _ints(args.get("strides"), n_sp, 1)
    pads = _pads(str(args.get("pad_type") or "valid"), args.get("pad"), list(x.shape[2:]), kernel, strides)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=fill)
    ones = np.pad(np.ones_like(x), [(0, 0), (0, 0), *pads])
    out_sp = [(xp.shape[2 + i] - kernel[i]) // strides[i] + 1 for i in range(n_sp)]
    acc = np.full((*x.shape[:2], *out_sp), fill, dtype=np.float32)
    cnt = np.zeros_like(acc)
    for kidx in itertools.product(*(range(k) for k in kernel)):
        sl = (slice(None), slice(None), *(
            slice(kidx[i], kidx[i] + (out_sp[i] - 1) * strides[i] + 1, strides[i]) for i in range(n_sp)))
        if kind == "max":
            acc = np.maximum(acc, xp[sl])
        else:
            acc = acc + xp[sl]
            cnt += ones[sl]
    if kind == "max":
        return acc
    if bool(args.get("exclude_padding_from_average")):
        return acc / np.maximum(cnt, 1.0)
    return acc / float(np.prod(kernel))


def batch_norm(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = float(args.get("epsilon") if args.get("epsilon") is not None else 1e-5)
    mean = np.reshape(args["mean"], shape)
    var = np.reshape(args["variance"], shape)
    out = (x - mean) / np.sqrt(var + eps)
    if args.get("gamma") is not None:
        out = out * np.reshape(args["gamma"], shape)
    if args.get("beta") is not None:
        out = out + np.reshape(args["beta"], shape)
    return out


def instance_norm(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"].astype(np.float64)
    axes = tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps = float(args.get("epsilon") if args.get("epsilon") is not None else 1e-5)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    if args.get("gamma") is not None:
        out = out * np.reshape(args["gamma"], shape)
    if args.get("beta") is not None:
        out = out + np.reshape(args["beta"], shape)
    return out


def upsample_nearest_neighbor(op: Any, args: dict[str, Any]) -> np.ndarray:
    """(..., H, W) -> (..., floor(H * sh), floor(W * sw)) with out[i] = in[floor(i * in / out)] (Core ML's
    index rule; floor(i / scale) differs for fractional scales)."""
    x = args["x"]
    sh = float(args.get("scale_factor_height") if args.get("scale_factor_height") is not None else 1)
    sw = float(args.get("scale_factor_width") if args.get("scale_factor_width") is not None else 1)
    h, w = x.shape[-2:]
    oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    ri = np.minimum((np.arange(oh) * h) // max(oh, 1), h - 1)
    ci = np.minimum((np.arange(ow) * w) // max(ow, 1), w - 1)
    return x[..., ri, :][..., ci]


def pixel_shuffle(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    r = int(args["upscale_factor"])
    n, c, h, w = x.shape
    y = x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (r * r), h * r, w * r)


def pixel_unshuffle(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    r = int(np.asarray(args["downscale_factor"]).reshape(-1)[0])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * r * r, h // r, w // r)


def depth_to_space(op: Any, args: dict[str, Any]) -> np.ndarray:
    """DCR order (TensorFlow ``depth_to_space``)."""
    x = args["x"]
    b = int(args["block_size"])
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    b = int(args["block_size"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


OPS = {
    "conv": conv,
    "conv_transpose": conv_transpose,
    "avg_pool": lambda op, args: _pool(op, args, "avg"),
    "max_pool": lambda op, args: _pool(op, args, "max"),
    "batch_norm": batch_norm,
    "instance_norm": instance_norm,
    "upsample_nearest_neighbor": upsample_nearest_neighbor,
    "pixel_shuffle": pixel_shuffle,
    "pixel_unshuffle": pixel_unshuffle,
    "depth_to_space": depth_to_space,
    "space_to_depth": space_to_depth,
}
