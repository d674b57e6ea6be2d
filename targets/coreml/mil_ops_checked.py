"""Ops whose coremltools ``value_inference`` is incomplete, and the attribute rules of the executor.

coremltools' numpy ``value_inference`` ignores ``concat(interleave=True)`` and the ``mode`` of
``scatter_along_axis``, breaks on ``cumsum(exclusive=True)`` and ``flatten2d`` at the rank
boundaries, refuses ``range_1d`` results over 1 MB and wraps negative gather / scatter indices
that the iOS 17+ op spec calls out of bound. They are written out here from the MIL op reference.
``check_attributes`` runs at load time: an attribute value the executor does not implement
raises ``UnsupportedOpError`` naming the op and the attribute, rather than computing something else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .mil_ops import UnsupportedOpError, via_value_inference


def _default(op: Any, name: str) -> Any:
    try:
        return dict(op.default_inputs().items()).get(name)
    except Exception:  # noqa: BLE001 - ops without defaults
        return None


def _attr(op: Any, args: dict[str, Any], name: str) -> Any:
    v = args.get(name)
    return _default(op, name) if v is None else v


def _negative_indices_allowed(op: Any) -> bool:
    """iOS 15/16 gather / scatter ops take indices in [-D, D); from iOS 17 only [0, D) (MIL spec)."""
    return "validate_indices" not in type(op).input_spec.input_types


def _check_indices(op: Any, indices: np.ndarray, dim: int) -> np.ndarray:
    indices = np.asarray(indices).astype(np.int64)
    low = -dim if _negative_indices_allowed(op) else 0
    bad = (indices < low) | (indices >= dim)
    if bad.any():
        raise IndexError(
            f"index {int(indices[bad].reshape(-1)[0])} out of range [{low}, {dim}) along the op's axis "
            f"(the MIL spec of {op.op_type} in this opset; fix the indices fed to the program)")
    return np.where(indices < 0, indices + dim, indices)


def concat(op: Any, args: dict[str, Any]) -> np.ndarray:
    values = [np.asarray(v) for v in args["values"]]
    axis = int(args["axis"])
    if not bool(_attr(op, args, "interleave") or False):
        return np.concatenate(values, axis=axis)
    # interleave: out[..., i * n + j, ...] = values[j][..., i, ...] (all inputs share one shape)
    stacked = np.stack(values, axis=(axis % values[0].ndim) + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


def flatten2d(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = np.asarray(args["x"])
    axis = int(_attr(op, args, "axis") if _attr(op, args, "axis") is not None else 1)
    if axis < 0:
        axis += x.ndim
    if not 0 <= axis <= x.ndim:
        raise IndexError(f"flatten2d axis {axis} outside [-{x.ndim}, {x.ndim}]")
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64)))


def range_1d(op: Any, args: dict[str, Any]) -> np.ndarray:
    start, end, step = (np.asarray(args[k]).reshape(()) for k in ("start", "end", "step"))
    return np.arange(start, end, step)


def cumsum(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = np.asarray(args["x"])
    axis = int(_attr(op, args, "axis") or 0)
    data = np.flip(x, axis=axis) if bool(_attr(op, args, "reverse")) else x
    out = np.cumsum(data, axis=axis)
    if bool(_attr(op, args, "exclusive")):
        out = out - data
    return np.flip(out, axis=axis) if bool(_attr(op, args, "reverse")) else out


_SCATTER_MODES = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def scatter_along_axis(op: Any, args: dict[str, Any]) -> np.ndarray:
    """``data`` with ``updates`` combined in at ``indices`` along ``axis`` (mode default ``add``)."""
    data = np.array(args["data"], copy=True)
    axis = int(_attr(op, args, "axis") or 0) % data.ndim
    mode = str(_attr(op, args, "mode") or "add")
    idx = _check_indices(op, args["indices"], data.shape[axis])
    updates = np.asarray(args["updates"]).astype(data.dtype)
    coords = list(np.indices(idx.shape, sparse=True))
    coords[axis] = idx
    coords = tuple(np.broadcast_to(c, idx.shape) for c in coords)
    if mode == "update":
        data[coords] = updates
    else:
        _SCATTER_MODES[mode].at(data, coords, updates)
    return data


def gather(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = np.asarray(args["x"])
    axis = int(_attr(op, args, "axis") or 0) % x.ndim
    idx = _check_indices(op, args["indices"], x.shape[axis]).astype(np.int32)
    return via_value_inference(op, {**args, "indices": idx})


def gather_along_axis(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = np.asarray(args["x"])
    axis = int(_attr(op, args, "axis") or 0) % x.ndim
    return np.take_along_axis(x, _check_indices(op, args["indices"], x.shape[axis]), axis=axis)


# op type -> attribute -> (is the value supported?, what we do support). Attributes not listed here
# are implemented in full.
_GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")
_PAD_TYPES = ("valid", "same", "same_lower", "custom")
ATTRIBUTE_RULES: dict[str, dict[str, tuple[Any, str]]] = {
    "avg_pool": {"ceil_mode": (lambda v: not v, "ceil_mode=False"),
                 "pad_type": (lambda v: v in _PAD_TYPES, f"pad_type in {_PAD_TYPES}")},
    "max_pool": {"ceil_mode": (lambda v: not v, "ceil_mode=False"),
                 "pad_type": (lambda v: v in _PAD_TYPES, f"pad_type in {_PAD_TYPES}")},
    "conv": {"pad_type": (lambda v: v in _PAD_TYPES, f"pad_type in {_PAD_TYPES}")},
    "conv_transpose": {"pad_type": (lambda v: v in _PAD_TYPES, f"pad_type in {_PAD_TYPES}")},
    "gelu": {"mode": (lambda v: v in _GELU_MODES, f"mode in {_GELU_MODES}")},
    "topk": {"return_indices": (lambda v: v is None or bool(v), "return_indices=True")},
    "scatter_along_axis": {"mode": (lambda v: v in (*_SCATTER_MODES, "update"),
                                    f"mode in {(*_SCATTER_MODES, 'update')}")},
}

# output shapes these ops read from the program's types: they need static shapes
_STATIC_OUTPUT_OPS = ("conv_transpose",)


def check_attributes(op: Any) -> None:
    """Raise ``UnsupportedOpError`` for an attribute value (or a dynamic shape) we do not implement."""
    for name, (ok, supported) in ATTRIBUTE_RULES.get(op.op_type, {}).items():
        var = op.inputs.get(name)
        value = var.val if var is not None else _default(op, name)
        if value is None:
            continue
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (str, np.str_)):
            value = str(value)
        if not ok(value):
            raise UnsupportedOpError(op.op_type, op.name, attribute=f"{name}={value!r}",
                                     detail=f"the executor implements {supported}")
    if op.op_type in _STATIC_OUTPUT_OPS:
        shape = tuple(op.outputs[0].shape)
        if not all(isinstance(d, (int, np.integer)) for d in shape):
            raise UnsupportedOpError(op.op_type, op.name, attribute=f"flexible output shape {shape}",
                                     detail="the executor runs this op on static shapes only")


OPS = {
    "concat": concat,
    "flatten2d": flatten2d,
    "range_1d": range_1d,
    "cumsum": cumsum,
    "scatter_along_axis": scatter_along_axis,
    "gather": gather,
    "gather_along_axis": gather_along_axis,
}
