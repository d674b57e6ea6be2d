"""Op lists read from compiled artifacts, so rewrites, placement and quantization move the estimate.

- Core ML: the MIL program of the ``.mlpackage`` (coremltools' MIL-proto loader); placement from
  the ANE residency rules (an op the rules keep off the ANE runs on the GPU); weight bits from the
  const / constexpr op that feeds it (palettized LUT bits, int8 / int4 affine weights).
- ONNX: the graph with ONNX shape inference; initializers are weights (their dtype gives the bits;
  a DequantizeLinear of an int8 initializer stays a weight); float initializers are priced at the
  estimate's precision.
- ExecuTorch (.pte): delegate payloads are opaque blobs, so the ops are the traced float graph of
  the bundle's config at its quant preset, with the CPU fallbacks the partition record names.
"""

from __future__ import annotations

import math
from typing import Any

from s2dit_deploy.bundle import Bundle

from .op_trace import Op

_MIL_KIND = {"linear": "matmul", "conv": "conv", "conv_transpose": "conv", "scaled_dot_product_attention": "attention"}
_MIL_LAYOUT = {"transpose", "concat", "split", "slice_by_index", "slice_by_size", "gather", "gather_nd", "tile",
               "pad", "pixel_shuffle", "space_to_depth", "depth_to_space", "upsample_nearest_neighbor", "cast",
               "identity", "stack"}
_MIL_VIEWS = {"reshape", "expand_dims", "squeeze"}


def _numel(shape) -> int:
    return int(math.prod(d if isinstance(d, int) else 1 for d in (shape or ())))


def _const_bits(op) -> int | None:
    """Bit width a constexpr weight is stored at (None for a plain fp const)."""
    t = op.op_type
    if t == "constexpr_lut_to_dense":
        lut = op.inputs.get("lut")
        n = lut.shape[-2] if lut is not None and lut.shape and len(lut.shape) >= 2 else 256
        return max(1, int(round(math.log2(n))))
    if t.startswith("constexpr_"):
        for v in op.inputs.values():
            dt = str(getattr(v, "dtype", ""))
            if "int4" in dt:
                return 4
            if "int8" in dt:
                return 8
        return 8
    return None


def coreml_ops(path: str, group_depth: int = 0) -> list[Op]:
    from s2dit_deploy.analysis import ane_residency as A

    prog = A.load_mil_program(path)
    out: list[Op] = []
    for op in A.walk_ops(prog.functions["main"]):
        if A.is_const(op):
            continue
        w_elems, a_elems, w_bits = 0, sum(_numel(o.shape) for o in op.outputs), None
        for v in op.inputs.values():
            for var in v if isinstance(v, (list, tuple)) else (v,):
                src = getattr(var, "op", None)
                if A.is_const(src):
                    if _numel(var.shape) > 1:
                        w_elems += _numel(var.shape)
                        w_bits = _const_bits(src) or w_bits
                else:
                    a_elems += _numel(getattr(var, "shape", ()))
        t = op.op_type
        if t in _MIL_VIEWS:
            continue
        if t == "matmul":
            kind = "matmul" if w_elems else "attention"
        else:
            kind = _MIL_KIND.get(t, "layout" if t in _MIL_LAYOUT else "vector")
        if kind == "conv" and _numel(op.weight.shape[2:]) == 1:
            kind = "matmul"  # a pointwise conv (the ANE form of a Linear) is a matmul
        unit = "npu" if not A.op_rules(op) else "gpu"
        out.append(Op(t, kind, float(A.op_flops(op)) if kind != "layout" else 0.0, w_elems, a_elems,
                      op.name, unit, w_bits))
    return out


_ONNX_BITS = {3: 8, 2: 8, 22: 4, 21: 4, 10: 16, 16: 16}  # int8, uint8, int4, uint4, fp16, bf16


def onnx_ops(path: str) -> list[Op]:
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes of a partly-inferable graph are still useful
        pass
    g = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*g.input, *g.output, *g.value_info]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    weights = {i.name: (list(i.dims), _ONNX_BITS.get(i.data_type)) for i in g.initializer}
    out: list[Op] = []
    for n in g.node:
        ins = [x for x in n.input if x]
        w_in = [x for x in ins if x in weights]
        if n.op_type in ("DequantizeLinear", "Cast", "Transpose", "Reshape", "Identity") and w_in and w_in[0] == ins[0]:
            weights[n.output[0]] = (weights[ins[0]][0], weights[ins[0]][1])  # still a weight
            continue
        if n.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Shape", "Constant",
                         "QuantizeLinear", "DequantizeLinear"):
            continue
        w_elems = sum(_numel(weights[x][0]) for x in w_in)
        bits = next((weights[x][1] for x in w_in if weights[x][1]), None)
        a_elems = sum(_numel(shapes.get(x, ())) for x in ins if x not in weights) + \
            sum(_numel(shapes.get(x, ())) for x in n.output)
        out_n = _numel(shapes.get(n.output[0], ()))
        if n.op_type in ("MatMul", "Gemm", "MatMulInteger"):
            a = shapes.get(ins[0]) or weights.get(ins[0], ([1], None))[0]
            flops, kind = 2.0 * out_n * (a[-1] if a else 1), ("matmul" if w_in else "attention")
        elif n.op_type in ("Conv", "ConvTranspose"):
            wshape = weights.get(ins[1], ([1, 1], None))[0]
            if n.op_type == "Conv":
                flops = 2.0 * out_n * math.prod(wshape[1:])
            else:
                flops = 2.0 * _numel(shapes.get(ins[0], ())) * math.prod(wshape[1:])
            kind = "conv" if math.prod(wshape[2:]) > 1 else "matmul"
        elif n.op_type in ("Transpose", "Concat", "Split", "Slice", "Gather", "Pad", "Tile", "Expand", "Cast",
                           "Resize", "DepthToSpace", "SpaceToDepth", "Where"):
            flops, kind = 0.0, "layout"
        else:
            flops, kind = float(out_n * (5 if "Norm" in n.op_type or n.op_type == "Softmax" else 1)), "vector"
        out.append(Op(n.op_type, kind, flops, w_elems, a_elems, n.name, "npu", bits))
    return out


def _config(bundle: Bundle):
    from s2dit_deploy.model_zoo.config import ModelConfig

    return ModelConfig.from_dict(bundle.model["config"])


def executorch_ops(bundle: Bundle, stage: str) -> list[Op]:
    from .stage_ops import stage_ops

    ops = stage_ops(_config(bundle), stage)
    placement = bundle.artifacts[stage].metadata.get("placement") or {}
    left = {}
    for fb in placement.get("fallbacks", []) or []:
        base = str(fb.get("op", "")).removeprefix("aten.").split(".")[0]
        left[base] = left.get(base, 0) + int(fb.get("count", 0) or 0)
    out = []
    for op in ops:
        if left.get(op.name, 0) > 0:
            left[op.name] -= 1
            op = op.with_unit("cpu")
        out.append(op)
    return out


# where a target's runtime puts the ops it is given (Core ML: per op, from the ANE residency rules)
TARGET_UNIT = {"executorch-qnn": "npu", "onnx-qnn": "npu", "executorch-xnnpack": "cpu", "onnx": "cpu",
               "coreai": "npu"}


def bundle_stage_ops(bundle: Bundle, stage: str) -> tuple[list[Op], str]:
    """(ops, where they came from) for one stage of a bundle; XNNPACK and ONNX Runtime's CPU EP put
    every op on the CPU, the QNN targets on the HTP (less the partition record's fallbacks)."""
    ops, origin = _stage_ops(bundle, stage)
    unit = TARGET_UNIT.get(bundle.artifacts[stage].target)
    if unit == "cpu":
        ops = [o.with_unit("cpu") for o in ops]
    return ops, origin


def _stage_ops(bundle: Bundle, stage: str) -> tuple[list[Op], str]:
    art = bundle.artifacts[stage]
    if len(art.files) > 1 and art.target in ("coreml", "onnx", "onnx-qnn"):
        src_ops: list[Op] = []
        for i in range(len(art.files)):
            f = str(art.path(bundle.path, i))
            if f.endswith(".mlpackage"):
                src_ops += coreml_ops(f)
            elif f.endswith(".onnx"):
                src_ops += onnx_ops(f)
        if src_ops:
            return src_ops, f"{art.target} program ({len(art.files)} files)"
    first = str(art.path(bundle.path, 0))
    if art.target == "coreai":  # no op reader for .aimodel bytecode here; the program is the traced stage
        from .stage_ops import stage_ops

        return list(stage_ops(_config(bundle), stage)), "traced float graph of the bundle's config (Core AI .aimodel)"
    if first.endswith(".mlpackage"):
        return coreml_ops(first), "MIL program (.mlpackage), ANE residency rules"
    if first.endswith(".onnx"):
        return onnx_ops(first), "ONNX graph (shape inference)"
    return executorch_ops(bundle, stage), "traced float graph of the bundle's config + partition-record CPU fallbacks"


def bundle_info(bundle: Bundle) -> dict[str, Any]:
    return {"target": bundle.target, "quant": bundle.info.get("quant"), "model": bundle.model.get("name")}
