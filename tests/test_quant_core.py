"""Quantizer core: observers vs hand-computed scales, fake-quant error bounds, plans, allocation, sizes."""

import itertools
import json
import math

import pytest
import torch
from s2dit_deploy.quant.allocate import BudgetError, allocate, budget_bytes, layer_costs
from s2dit_deploy.quant.fake_quant import fake_quant_act, fake_quant_weight
from s2dit_deploy.quant.observers import LayerInputObserver, act_qparams, weight_scale
from s2dit_deploy.quant.plan import FORMAT, LayerQuant, QuantPlan, legalize, preset_plan
from s2dit_deploy.quant.schemes import TARGET_SCHEMES, weight_scheme
from s2dit_deploy.quant.size import StageLayout, plan_size


def test_per_channel_scales_match_hand_computation():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.2, -0.3]])
    s8 = weight_scale(w, weight_scheme("int8-pc")).flatten()
    s4 = weight_scale(w, weight_scheme("int4-pc")).flatten()
    assert torch.allclose(s8, torch.tensor([2.0 / 127, 0.3 / 127]))
    assert torch.allclose(s4, torch.tensor([2.0 / 7, 0.3 / 7]))
    st = weight_scale(w, weight_scheme("int8-pt"))
    assert torch.allclose(st, torch.tensor(2.0 / 127))


def test_per_block_scales_follow_torchao_8da4w():
    w = torch.zeros(2, 64)
    w[0, 3], w[0, 40], w[1, 10] = 3.0, -1.5, 0.75
    from s2dit_deploy.quant.observers import block_qparams

    scale, _, block = block_qparams(w, weight_scheme("int4-b32"))
    assert block == (1, 32)
    assert torch.allclose(scale.flatten()[[0, 1, 2]], torch.tensor([3.0, 1.5, 0.75]) / 7.5)


@pytest.mark.parametrize("scheme,qmax", [("int8-pc", 127), ("int4-pc", 7), ("int4-pc-mse", 7)])
def test_weight_round_trip_error_bound(scheme, qmax):
    w = torch.randn(16, 48)
    fq = fake_quant_weight(w, scheme)
    s = weight_scale(w, weight_scheme(scheme))
    err = (fq - w).abs()
    inside = w.abs() <= s * qmax
    assert (err[inside] <= (s.expand_as(w) / 2 + 1e-6)[inside]).all()
    if scheme.endswith("mse"):  # the MSE clip never does worse than min-max per channel
        mm = fake_quant_weight(w, "int4-pc")
        assert ((fq - w).pow(2).sum(1) <= (mm - w).pow(2).sum(1) + 1e-9).all()
    assert len(torch.unique(fq[0])) <= 2 * qmax + 1


def test_block_and_lut_round_trip():
    w = torch.randn(8, 64)
    fq = fake_quant_weight(w, "int4-b32")
    amax = w.reshape(8, 2, 32).abs().amax(-1, keepdim=True)
    assert ((fq - w).reshape(8, 2, 32).abs() <= amax / 7.5 / 2 + 1e-6).all()
    lut = fake_quant_weight(w, "lut4")
    assert len(torch.unique(lut)) <= 16
    assert (lut - w).pow(2).mean() < (fake_quant_weight(w, "lut2") - w).pow(2).mean()


def test_activation_qparams_and_fake_quant():
    scale, zp, qmin, qmax = act_qparams(-1.0, 3.0, 8)
    assert math.isclose(scale, 4.0 / 255) and (qmin, qmax) == (-128, 127)
    assert zp == -128 + round(1.0 / scale)
    x = torch.linspace(-1, 3, 1000)
    fq = fake_quant_act(x, "int8", (-1.0, 3.0))
    assert (fq - x).abs().max() <= scale / 2 + 1e-6
    s16, zp16, _, q16 = act_qparams(-1.0, 3.0, 16)
    assert zp16 == 0 and math.isclose(s16, 3.0 / 32767)
    dyn = fake_quant_act(torch.randn(4, 10, 8), "int8-dyn", None)
    assert dyn.shape == (4, 10, 8)
    with pytest.raises(ValueError, match="calibrated range"):
        fake_quant_act(x, "int8", None)


def test_layer_observer_ranges_and_nan():
    obs = LayerInputObserver("dit_step:blk.q", -1, percentile=99.0)
    torch.manual_seed(0)
    x = torch.randn(2000, 8)
    x[0, 0] = 50.0  # one outlier
    obs(x)
    st = obs.stats()
    assert st.max == 50.0 and st.pct_hi < 5.0 and st.mse_hi <= 50.0 * 1.01
    assert len(st.mean_sq) == 8
    from s2dit_deploy.quant.capture import CalibrationError

    with pytest.raises(CalibrationError, match=r"NaN in the input of layer 'dit_step:blk.q'"):
        obs(torch.tensor([[float("nan")] * 8]))


def _layout():
    return {"dit_step": StageLayout({"patch_embed": (64, 16), "blk.q": (64, 64), "blk.ffn": (128, 64), "head": (16, 64)},
                                    {"patch_embed": "Linear", "blk.q": "Linear", "blk.ffn": "Linear", "head": "Linear"}, 100)}


def _stats(lay):
    from s2dit_deploy.quant.observers import ActStats

    return {s: {n: ActStats(-1, 2, 2, -0.9, 1.8, -0.8, 1.7, 1, [1.0]) for n in l.layers} for s, l in lay.items()}


def test_plan_json_round_trip_and_legality(tmp_path):
    lay = _layout()
    plan = preset_plan("w4a8-seed", lay, "toy", "coreml", _stats(lay))
    assert plan.stages["dit_step"]["patch_embed"].weight == "int8-pc"
    assert plan.stages["dit_step"]["blk.q"].weight == "int4-pc"
    assert plan.stages["dit_step"]["blk.q"].act_range == (-0.9, 1.8)
    path = plan.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["format"] == FORMAT
    assert QuantPlan.load(path) == plan
    bad = QuantPlan("x", "toy", {"dit_step": {"blk.q": LayerQuant("int4-b32", "int8", (0, 1))}})
    with pytest.raises(ValueError, match="never per-block"):
        bad.check_target("coreml")
    with pytest.raises(ValueError, match="not a quantization plan"):
        QuantPlan.from_dict({"format": "nope"})
    assert legalize("int4-pc", "int8", "executorch-xnnpack") == ("int4-b32", "int8-dyn")
    assert legalize("int4-pc", "int16", "coreml") == ("int4-pc", "float")
    with pytest.raises(ValueError, match="calibrated activation ranges"):
        preset_plan("w8a8", lay, "toy", "coreml", stats=None)


def test_no_target_allows_per_block_on_the_neural_engine():
    for name in TARGET_SCHEMES["coreml"].weights:
        assert weight_scheme(name).granularity != "block"


def test_allocator_respects_budget_legality_and_is_optimal():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (128, 64)}
    results = {
        "a": {"int8-pc": {"mse": 1.0}, "int4-pc": {"mse": 9.0}, "lut3": {"mse": 30.0}, "int4-b32": {"mse": 0.1}},
        "b": {"int8-pc": {"mse": 0.1}, "int4-pc": {"mse": 0.5}, "lut3": {"mse": 2.0}, "int4-b32": {"mse": 0.01}},
        "c": {"int8-pc": {"mse": 2.0}, "int4-pc": {"mse": 40.0}, "lut4": {"mse": 20.0}, "lut3": {"mse": 90.0},
              "int4-b32": {"mse": 0.1}},
    }
    costs = layer_costs(results, shapes, "coreml")
    assert all("int4-b32" not in opts for opts in costs.values())
    uniform = budget_bytes(shapes, like={n: "int4-pc" for n in shapes})
    choice = allocate(costs, uniform)
    used = sum(costs[n][s][0] for n, s in choice.items())
    assert used <= uniform + 1e-6
    assert all(weight_scheme(s).granularity != "block" for s in choice.values())
    best = min((sum(costs[n][s][1] for n, s in zip(shapes, combo)), combo)
               for combo in itertools.product(*(costs[n] for n in shapes))
               if sum(costs[n][s][0] for n, s in zip(shapes, combo)) <= uniform)
    got = sum(costs[n][s][1] for n, s in choice.items())
    assert got <= best[0] * 1.5 + 1e-9  # greedy on convex hulls: near the brute-force optimum here
    assert got < sum(costs[n]["int4-pc"][1] for n in shapes)  # beats uniform int4 at the same size
    with pytest.raises(BudgetError):
        allocate(costs, 10.0)


def test_plan_size_counts_bits():
    lay = _layout()
    plan = preset_plan("w8a8", lay, "toy", "coreml", _stats(lay))
    size = plan_size(plan, lay)
    n = sum(math.prod(s) for s in lay["dit_step"].layers.values())
    assert size["weights"] == n
    assert 8.0 < size["avg_weight_bits"] < 8.6  # 8 bits + one fp16 scale per row
    assert size["bytes"] == int(n + 2 * sum(s[0] for s in lay["dit_step"].layers.values()) + 200)


def test_per_block_presets_fall_back_where_rows_are_not_whole_blocks():
    from s2dit_deploy.quant.schemes import fits

    assert fits("int4-b32", (8, 64)) and not fits("int4-b32", (8, 27)) and fits("int4-pc", (8, 27))
    lay = StageLayout({"proj": (16, 64), "patch_embed": (16, 27)}, {"proj": "Linear", "patch_embed": "Linear"}, 0)
    plan = preset_plan("w4a8-uniform", {"dit_step": lay}, "toy", "executorch-xnnpack")
    assert plan.layer("dit_step", "proj").weight == "int4-b32"
    assert plan.layer("dit_step", "patch_embed").weight == "int8-pc"
    plan.check_target("executorch-xnnpack")


def test_preset_sizes_from_the_meta_layout():
    from s2dit_deploy.quant.preset_sizes import preset_sizes

    rows = {(r["target"], r["preset"]): r for r in preset_sizes("s2dit-tiny")}
    for target in ("coreml", "executorch-xnnpack"):
        assert rows[(target, "w8a8")]["avg_weight_bits"] > rows[(target, "w4a8-uniform")]["avg_weight_bits"]
        assert rows[(target, "w4a8-seed")]["avg_weight_bits"] >= rows[(target, "w4a8-uniform")]["avg_weight_bits"]
