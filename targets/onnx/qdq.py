"""Static QDQ quantization of an exported stage with ONNX Runtime, calibrated on recorded inputs.

Shared by ``onnx`` (QDQ model on the CPU EP) and ``onnx-qnn`` (QDQ model compiled for HTP). A
QuantPlan is translated by ``s2dit_deploy.quant.onnx.apply_plan``; without one, ``precision``
picks uint8 (``8a8w``) or uint16 (``16a8w``) activations with int8 per-channel weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from s2dit_deploy.stages import Stage


class _Reader:
    """A CalibrationDataReader over named numpy inputs."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed by MinMax; present for the protocol
        pass


def layer_norm_overrides(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    """LayerNorm scales as asymmetric uint8 per tensor: HTP's LayerNorm validation (error 3110)
    rejects the signed symmetric int8 the other weights use."""
    import onnx
    from onnxruntime.quantization import QuantType

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {n.input[1]: [{"quant_type": QuantType.QUInt8, "symmetric": False}]
            for n in model.graph.node if n.op_type == "LayerNormalization" and len(n.input) > 1
            and n.input[1] in inits}


def quantize_qdq(float_model: Path, out: Path, samples: list[dict[str, np.ndarray]], precision: str,
                 plan: Any = None, stage: Stage | None = None) -> dict[str, Any]:
    """Static QDQ quantization (QNN EP conventions, also run by the CPU EP); returns the summary."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(samples)
    overrides: dict[str, Any] = {}
    if plan is not None:
        from s2dit_deploy.quant import onnx as quant_onnx

        overrides = dict(quant_onnx.apply_plan(plan, stage=stage, model_path=float_model))
    act = QuantType.QUInt16 if precision == "16a8w" else QuantType.QUInt8
    kwargs = {"activation_type": act, "weight_type": QuantType.QInt8, "per_channel": True,
              "weight_symmetric": True, **overrides}
    kwargs["init_overrides"] = {**layer_norm_overrides(float_model), **(kwargs.get("init_overrides") or {})}
    config = get_qnn_qdq_config(str(float_model), reader, **kwargs)
    quantize(str(float_model), str(out), config)
    return {"precision": precision, "scheme": "onnxruntime QDQ (get_qnn_qdq_config)",
            "activation_type": str(kwargs["activation_type"]), "weight_type": str(kwargs["weight_type"]),
            "per_channel": bool(kwargs["per_channel"]), "calibration_samples": len(samples),
            "plan": getattr(plan, "name", None) if plan is not None else None,
            "overridden_tensors": len(kwargs.get("init_overrides") or {}),
            "float_nodes": len(kwargs.get("nodes_to_exclude") or [])}
