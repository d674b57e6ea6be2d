"""Calibration and mixed-precision quantization (QuantPlan) for every target.

One concept per module: ``schemes`` (scheme names, storage cost, per-target legality),
``observers`` (weight scales, activation ranges), ``fake_quant`` (quantize-dequantize in the float
model), ``gptq`` (GPTQ rounding on the plan's grid), ``rounded_weights`` (a plan's hashed GPTQ
weights sidecar), ``capture`` (calibration set on disk + per-layer statistics), ``sensitivity``
(one layer at a time, cached), ``allocate`` (size-budgeted bit allocation), ``stream_search``
(choosing among allocations by the decoded stream), ``plan`` (QuantPlan, presets), ``workflow``
(``sd.calibrate``), ``resolve`` (``--quant`` -> a plan that fits the model), ``size`` (bytes from
shapes, meta device), ``evaluate`` (fidelity on disjoint prompts), ``report`` (table + plots), and
the translations ``coreml``, ``qnn``, ``onnx`` and ``xnnpack``.
"""
