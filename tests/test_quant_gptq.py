"""GPTQ rounding on the plan's grid, the plan's rounded-weights sidecar, preset meanings, plan fit checks."""

import json

import pytest
import torch
from s2dit_deploy.quant.errors import CalibrationConfigError, PlanMismatchError, RoundedWeightsError
from s2dit_deploy.quant.gptq import gptq_round, hit_grid_ends, on_grid
from s2dit_deploy.quant.observers import weight_scale
from s2dit_deploy.quant.plan import PRESETS, LayerQuant, QuantPlan, preset_plan
from s2dit_deploy.quant.resolve import resolve_plan
from s2dit_deploy.quant.rounded_weights import install, sidecar_name
from s2dit_deploy.quant.schemes import fits, weight_scheme
from s2dit_deploy.quant.workflow import CalibrationSettings
from torch import nn


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Samples (seeded) of one fixed correlated distribution with unequal feature scales."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) * 0.3 + torch.eye(d)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d)) @ mix


def test_gptq_beats_round_to_nearest_on_held_out_inputs_and_stays_on_the_grid():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=False)
    original = layer.weight.detach().clone()
    calib, held_out = _correlated_inputs(512, 64, 1), _correlated_inputs(512, 64, 2)
    out = gptq_round({"l": layer}, {"l": "int4-pc-gptq"}, [lambda: layer(calib)])["l"]
    assert torch.equal(layer.weight, original)  # the module is left as it was
    ws = weight_scheme("int4-pc-gptq")
    scale = weight_scale(original, ws)
    rtn = torch.clamp(torch.round(original / scale), -7, 7) * scale
    ref = held_out @ original.T
    err_gptq = (held_out @ out.T - ref).pow(2).mean()
    err_rtn = (held_out @ rtn.T - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    # min-max re-derivation (what Core ML, QNN and ONNX do) reproduces it exactly
    assert on_grid(out, "int4-pc-gptq") and not on_grid(original, "int4-pc-gptq")
    assert torch.equal((out / scale).round().abs().amax(1), torch.full((48,), 7.0))


def test_hit_grid_ends_moves_the_largest_entry_of_short_rows():
    scale = torch.ones(2, 1)
    w = torch.tensor([[1.0, -7.0, 2.0], [3.0, -5.0, 0.0]])
    fixed, n = hit_grid_ends(w, scale, 7)
    assert n == 1 and torch.equal(fixed, torch.tensor([[1.0, -7.0, 2.0], [3.0, -7.0, 0.0]]))


def test_gptq_schemes_are_linear_only_and_not_offered_to_xnnpack():
    assert fits("int4-pc-gptq", (8, 16), "Linear") and not fits("int4-pc-gptq", (8, 16, 3, 3), "Conv2d")
    with pytest.raises(ValueError, match="per channel only"):
        weight_scheme("int4-b32-gptq")
    from s2dit_deploy.quant.schemes import TARGET_SCHEMES

    assert "int4-pc-gptq" in TARGET_SCHEMES["coreml"].weights and "int4-pc-gptq" in TARGET_SCHEMES["executorch-qnn"].weights
    assert not any("gptq" in w for w in TARGET_SCHEMES["executorch-xnnpack"].weights)


def _gptq_plan() -> QuantPlan:
    w = torch.tensor([[7.0, -3.0, 1.0], [-14.0, 2.0, 4.0]]) * 0.01
    return QuantPlan("p", "toy", {"dit_step": {"a": LayerQuant("int4-pc-gptq"), "b": LayerQuant("int8-pc")}},
                     "coreml", {"model_hash": "abc"}, {"dit_step": {"a": w}})


def test_rounded_weights_sidecar_round_trips_and_refuses_tampering(tmp_path):
    plan = _gptq_plan()
    path = plan.save(tmp_path / "plan.json")
    side = tmp_path / sidecar_name(path)
    assert side.name == "plan.weights.safetensors"
    doc = json.loads(path.read_text())
    assert doc["rounded_weights"]["file"] == side.name and str(tmp_path) not in path.read_text()
    back = QuantPlan.load(path)
    assert back == plan and torch.equal(back.rounded["dit_step"]["a"], plan.rounded["dit_step"]["a"])
    raw = bytearray(side.read_bytes())
    raw[-1] ^= 1
    side.write_bytes(bytes(raw))
    with pytest.raises(RoundedWeightsError, match="SHA-256 .* differs"):
        QuantPlan.load(path)
    doc["rounded_weights"]["file"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(doc))
    with pytest.raises(RoundedWeightsError, match="bare file name"):
        QuantPlan.load(path)
    with pytest.raises(ValueError, match="-gptq layers without rounded weights: dit_step:a"):
        QuantPlan("p", "toy", {"dit_step": {"a": LayerQuant("int4-pc-gptq")}})


def test_install_checks_shape_and_grid():
    class Pipe:
        dit = nn.Module()

    pipe = Pipe()
    pipe.dit.a = nn.Linear(3, 2, bias=False)
    plan = _gptq_plan()
    assert install(pipe, plan) == ["dit_step:a"]
    assert torch.equal(pipe.dit.a.weight.detach(), plan.rounded["dit_step"]["a"])
    pipe.dit.a = nn.Linear(4, 2, bias=False)
    with pytest.raises(RoundedWeightsError, match="shape .* another model"):
        install(pipe, plan)
    pipe.dit.a = nn.Linear(3, 2, bias=False)
    off = QuantPlan("p", "toy", plan.stages, "coreml", {}, {"dit_step": {"a": torch.rand(2, 3)}})
    with pytest.raises(RoundedWeightsError, match="not on the grid"):
        install(pipe, off)


def test_each_preset_name_has_one_meaning():
    from s2dit_deploy.quant.size import StageLayout

    lay = {"dit_step": StageLayout({"patch_embed": (8, 4), "blk.q": (8, 8)}, {"patch_embed": "Linear", "blk.q": "Linear"}, 0)}
    stats = {"dit_step": {n: (-1.0, 1.0) for n in lay["dit_step"].layers}}
    assert "w4a8-seed" in PRESETS and "w4a8-mixed" in PRESETS
    seed = preset_plan("w4a8-seed", lay, "toy", "coreml", stats)
    assert seed.stages["dit_step"]["patch_embed"].weight == "int8-pc" and seed.stages["dit_step"]["blk.q"].weight == "int4-pc"
    with pytest.raises(ValueError, match="allocated from measured sensitivity.*'w4a8-seed'"):
        preset_plan("w4a8-mixed", lay, "toy", "coreml", stats)
    with pytest.raises(KeyError, match="presets: w8a8, w4a8-uniform, w4a8-seed, w4a8-mixed, w4a16"):
        preset_plan("w4a9", lay, "toy", "coreml", stats)


def test_calibration_settings_name_the_bad_field():
    with pytest.raises(CalibrationConfigError, match="prompts=0"):
        CalibrationSettings(prompts=0)
    with pytest.raises(CalibrationConfigError, match="measure=.*round-to-nearest"):
        CalibrationSettings(measure=("int4-pc-gptq",))
    with pytest.raises(CalibrationConfigError, match="target='tpu'"):
        CalibrationSettings(target="tpu")
    assert CalibrationSettings().key() == CalibrationSettings().key() != CalibrationSettings(calls=3).key()


def test_a_plan_for_other_weights_or_resolution_is_refused_unless_recalibrating(tmp_path, monkeypatch):
    from s2dit_deploy.model_zoo.pipeline import load_pipeline
    from s2dit_deploy.quant.capture import model_hash

    monkeypatch.setenv("S2DIT_CACHE", str(tmp_path))
    pipe = load_pipeline("s2dit-tiny")
    plan = resolve_plan("w8a8", pipe, "coreml")
    assert plan.provenance["model_hash"] == model_hash(pipe)
    other = plan.with_provenance(model_hash="0123456789abcdef", resolution="8x8")
    with pytest.raises(PlanMismatchError, match="calibrated on weights 0123456789abcdef.*resolution 8x8.*--recalibrate"):
        resolve_plan(other, pipe, "coreml")
    again = resolve_plan(other, pipe, "coreml", recalibrate=True)
    assert again.provenance["model_hash"] == model_hash(pipe) and again.stages == plan.stages


def test_allocation_widens_the_inputs_that_hurt_and_respects_what_a_target_quantizes():
    from s2dit_deploy.quant import allocate as alloc

    results = {"a": {"act_only": {"mse": 9.0}, "int4-pc": {"mse": 10.0}, "int8-pc": {"mse": 9.1}},
               "b": {"act_only": {"mse": 0.1}, "int4-pc": {"mse": 2.0}, "int8-pc": {"mse": 0.2}}}
    # a's 8-bit input is 99% of the activation noise: 16-bit where the target can (fp16 on Core ML)
    assert alloc.wide_activation_layers(results, "coreml") == {"a": "float"}
    assert alloc.wide_activation_layers(results, "onnx") == {"a": "int16"}
    shapes = {"a": (8, 8), "b": (8, 8)}
    base = QuantPlan("u", "toy", {"dit_step": {n: LayerQuant("int4-pc", "int8", (-1.0, 1.0)) for n in shapes}},
                     "coreml")
    budget = alloc.budget_bytes(shapes, like={"a": "int4-pc", "b": "int8-pc"})
    plan = alloc.mixed_plan(base, "dit_step", results, shapes, budget, 1.0, wide_acts={"a": "float"})
    # with a's activation noise gone, a's weights are cheap to keep at int4: b gets the int8 bytes
    assert plan.stages["dit_step"]["a"] == LayerQuant("int4-pc", "float", None)
    assert plan.stages["dit_step"]["b"].weight == "int8-pc" and plan.stages["dit_step"]["b"].act == "int8"
    # XNNPACK's translation quantizes Linear layers only: a Conv keeps fp16 whatever it measured
    costs = alloc.layer_costs(results, shapes, "executorch-xnnpack", kinds={"a": "Conv2d", "b": "Linear"})
    assert list(costs["a"]) == ["fp16"] and "int8-pc" in costs["b"]
