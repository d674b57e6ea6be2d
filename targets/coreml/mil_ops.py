"""Op registry of the Core ML reference executor: MIL op type -> numpy implementation.

Every entry takes ``(op, args)`` and returns one array (or a tuple for multi-output ops):
``op`` is the pymil ``Operation`` (static attributes, output types) and ``args`` maps each input
name to its runtime value (a numpy array, a tuple of arrays for tuple inputs, or a ``StateSlot``
for state inputs). Float16 inputs arrive already widened to float32; the executor casts every
result to the op's declared output dtype, which is how fp16 programs get Core ML's per-op fp16
rounding.

Where coremltools' own MIL op class carries an exact numpy ``value_inference`` (elementwise,
matmul, reshape, slicing, reductions, softmax, layer_norm, scaled_dot_product_attention, ...),
the entry is ``via_value_inference``: the op's own implementation is run on a shadow copy of the
op whose inputs hold the runtime values. Numpy is written here only where coremltools has none
(or a slow one), and where its value_inference is incomplete (``mil_ops_checked``: concat interleave,
scatter modes, index bounds, ... plus the load-time attribute rules); see ``mil_ops_nn`` (conv,
norms, resampling) and ``mil_ops_quant`` (weight decompression, activation quantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    from s2dit_deploy.errors import ToolchainUnavailable
except ImportError:  # loaded as a plain module by a bundle's standalone host/reference_host.py
    class ToolchainUnavailable(RuntimeError):  # type: ignore[no-redef]
        """A program needs what this executor lacks (s2dit_deploy.errors.ToolchainUnavailable)."""

try:  # scipy ships with scikit-learn here; fall back to math.erf when it is absent
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover - exercised only without scipy
    _erf = np.vectorize(math.erf, otypes=[np.float64])

OpFn = Callable[[Any, dict[str, Any]], Any]

ISSUE_HINT = "file an issue for the s2dit-deploy Core ML target (or add it to targets/coreml/mil_ops.py)"


class UnsupportedOpError(ToolchainUnavailable, NotImplementedError):
    """Our executor cannot run this legal program: an op type, or an attribute value, it does not implement."""

    def __init__(self, op_type: str, op_name: str, others: list[str] | None = None,
                 attribute: str | None = None, detail: str = ""):
        self.op_type = op_type
        self.op_name = op_name
        self.attribute = attribute
        if attribute is not None:
            super().__init__(
                f"Core ML reference executor: MIL op {op_type!r} (op {op_name!r}) with {attribute} is not "
                f"supported ({detail}); it would compute something else. Rebuild the program without it or "
                f"{ISSUE_HINT}")
            return
        extra = f"; other unsupported op types in this program: {', '.join(others)}" if others else ""
        super().__init__(
            f"Core ML reference executor: unsupported MIL op type {op_type!r} (op {op_name!r}){extra}. "
            f"Please {ISSUE_HINT}. Supported op types: {', '.join(supported_ops())}")


class StateSlot:
    """A mutable holder for one ``ct.StateType`` buffer while a program runs."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: np.ndarray):
        self.name = name
        self.value = value


class _RuntimeVar:
    """Stands in for a pymil ``Var`` inside ``value_inference``: same type, runtime value."""

    __slots__ = ("_val", "_var")

    def __init__(self, var: Any, val: Any):
        self._var = var
        self._val = val

    @property
    def val(self) -> Any:
        return self._val

    @property
    def sym_val(self) -> Any:
        return self._val

    @property
    def shape(self) -> tuple[int, ...]:
        """The runtime shape: in a flexible-shape program the declared one is symbolic."""
        return np.shape(self._val) if isinstance(self._val, np.ndarray) else self._var.shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._var, name)


def _shadow(op: Any, args: dict[str, Any]) -> Any:
    """A copy of ``op`` (same class and attributes) whose input vars carry the runtime values."""
    shadow = object.__new__(type(op))
    shadow.__dict__.update(op.__dict__)
    vars_ = dict(op._input_vars)
    for name, value in args.items():
        var = op._input_vars[name]
        if isinstance(var, (tuple, list)):
            wrapped: Any = tuple(_RuntimeVar(v, x) for v, x in zip(var, value))
        else:
            wrapped = _RuntimeVar(var, value)
        vars_[name] = wrapped
        shadow.__dict__[name] = wrapped
    shadow.__dict__["_input_vars"] = vars_
    return shadow


def _copy_arrays(args: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else
                tuple(x.copy() if isinstance(x, np.ndarray) else x for x in v) if isinstance(v, tuple) else v)
            for k, v in args.items()}


def via_value_inference(op: Any, args: dict[str, Any]) -> Any:
    """Run coremltools' own numpy ``value_inference`` of the op on runtime values.

    The executor hands out read-only arrays; a value_inference that writes into its input
    (``thresholded_relu`` does) fails on them and is retried on copies.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        try:
            return type(op).value_inference(_shadow(op, args))
        except ValueError as exc:
            if "read-only" not in str(exc):
                raise
            return type(op).value_inference(_shadow(op, _copy_arrays(args)))


def via_materialized_val_inference(op: Any, args: dict[str, Any]) -> Any:
    """coremltools' ``materialized_val_inference`` (the decompression of ``constexpr_*`` ops)."""
    return type(op).materialized_val_inference(_shadow(op, args))


def _val(args: dict[str, Any], name: str, default: Any = None) -> Any:
    v = args.get(name)
    return default if v is None else v


# ---- numpy where coremltools has no (or only a slow) value_inference ----------------------------

def _gelu(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    mode = str(_val(args, "mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    # coremltools' value_inference vectorises math.erf element by element (minutes on a DiT step)
    return 0.5 * x * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)))


def _silu(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def _sigmoid(op: Any, args: dict[str, Any]) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-args["x"]))


def _thresholded_relu(op: Any, args: dict[str, Any]) -> np.ndarray:
    x = args["x"]
    return np.where(x < float(_val(args, "alpha", 1.0)), np.zeros_like(x), x)


def _to_declared_shape(op: Any, args: dict[str, Any]) -> np.ndarray:
    """reshape / expand_dims / squeeze: the output shape is static and known from type inference;
    coremltools' value_inference re-derives it symbolically on every call (slow)."""
    shape = tuple(op.outputs[0].shape)
    if all(isinstance(d, (int, np.integer)) for d in shape):
        return np.reshape(args["x"], shape)
    return via_value_inference(op, args)


def _transpose(op: Any, args: dict[str, Any]) -> np.ndarray:
    return np.transpose(args["x"], [int(p) for p in np.asarray(args["perm"]).reshape(-1)])


def _identity(op: Any, args: dict[str, Any]) -> np.ndarray:
    return args["x"]


def _read_state(op: Any, args: dict[str, Any]) -> np.ndarray:
    return args["input"].value


def _coreml_update_state(op: Any, args: dict[str, Any]) -> np.ndarray:
    slot: StateSlot = args["state"]
    value = np.asarray(args["value"]).astype(slot.value.dtype)
    if value.shape != slot.value.shape:
        raise ValueError(f"state {slot.name!r}: write of shape {value.shape}, state is {slot.value.shape}")
    slot.value = value
    return value


# Op types whose coremltools value_inference is exact: used as they are (``_build_registry``
# overrides a few with numpy for speed or to avoid in-place writes: reshape, transpose, ...).
VALUE_INFERENCE_OPS = (
    "abs", "acos", "add", "asin", "atan", "atanh", "band_part", "cast", "ceil", "clamped_relu",
    "clip", "concat", "cos", "cosh", "cumsum", "einsum", "elu", "equal", "erf", "exp", "exp2",
    "expand_dims", "fill", "fill_like", "flatten2d", "floor", "floor_div", "gather",
    "gather_along_axis", "greater", "greater_equal", "inverse", "l2_norm", "layer_norm",
    "leaky_relu", "less", "less_equal", "linear", "linear_activation", "log", "logical_and",
    "logical_not", "logical_or", "logical_xor", "matmul", "maximum", "minimum", "mod", "mul",
    "not_equal", "pad", "pow", "prelu", "range_1d", "real_div", "reduce_argmax", "reduce_argmin",
    "reduce_l1_norm", "reduce_l2_norm", "reduce_log_sum", "reduce_log_sum_exp", "reduce_max",
    "reduce_mean", "reduce_min", "reduce_prod", "reduce_sum", "reduce_sum_square", "relu", "relu6",
    "reshape", "reverse", "round", "rsqrt", "scaled_dot_product_attention", "scaled_tanh",
    "select", "shape", "sigmoid_hard", "sign", "sin", "sinh", "slice_by_index", "slice_by_size",
    "slice_update", "softmax", "softplus", "softplus_parametric", "softsign", "split", "sqrt",
    "square", "squeeze", "stack", "sub", "tan", "tanh", "threshold", "thresholded_relu", "tile",
    "topk", "transpose", "scatter_along_axis", "argsort",
)


def _build_registry() -> dict[str, OpFn]:
    from . import mil_ops_checked, mil_ops_nn, mil_ops_quant

    ops: dict[str, OpFn] = {name: via_value_inference for name in VALUE_INFERENCE_OPS}
    ops.update({
        "gelu": _gelu,
        "silu": _silu,
        "sigmoid": _sigmoid,
        "identity": _identity,
        "reshape": _to_declared_shape,
        "expand_dims": _to_declared_shape,
        "squeeze": _to_declared_shape,
        "transpose": _transpose,
        "thresholded_relu": _thresholded_relu,
        "read_state": _read_state,
        "coreml_update_state": _coreml_update_state,
    })
    ops.update(mil_ops_checked.OPS)
    ops.update(mil_ops_nn.OPS)
    ops.update(mil_ops_quant.OPS)
    return ops


OPS: dict[str, OpFn] = _build_registry()


def supported_ops() -> list[str]:
    """Every MIL op type the reference executor runs (``const`` is handled by the loader)."""
    return sorted({*OPS, "const"})
