"""Calibration and mixed-precision quantization (QuantPlan) for every target.

One concept per module: ``schemes`` (scheme names, storage cost, per-target legality),
``observers`` (weight scales, activation ranges), ``fake_quant`` (quantize-dequantize in the float
model), ``capture`` (calibration set on disk + per-layer statistics), ``sensitivity`` (one layer at a
time, cached), ``allocate`` (size-budgeted bit allocation), ``plan`` (QuantPlan, presets,
``resolve_plan``), ``size`` (bytes from shapes, meta device), ``evaluate`` (fidelity on disjoint
prompts), ``report`` (table + plots), and the translations ``coreml`` and ``xnnpack``.
"""
