"""executorch-qnn: rewrites, SoC/precision errors, and .pte files run under x86 HTP emulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from s2dit_deploy.targets.qnn.rewrite import apply_host_inputs, rewrite_for_qnn
from torch import nn

from s2dit_deploy.targets.base import QuantPreset
from s2dit_deploy.stages import Stage, TensorSpec, build_stages
from s2dit_deploy.fidelity import psnr


class Toy(nn.Module):
    """Tokens -> linear/LayerNorm/GELU -> causal depthwise Conv3d over frames (the LCHA local path)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.local = nn.Conv3d(32, 32, (2, 3, 3), padding=(0, 1, 1), groups=32)

    def forward(self, x):
        y = nn.functional.gelu(self.norm(self.lin(x)), approximate="tanh")
        y = y.reshape(1, 3, 4, 4, 32).permute(0, 4, 1, 2, 3)
        return (self.local(y),)


@pytest.fixture(scope="module")
def toy() -> Stage:
    torch.manual_seed(0)
    mod = Toy().eval()
    x = torch.randn(1, 48, 16)
    with torch.no_grad():
        (y,) = mod(x)
    return Stage("toy", mod, (x,), (TensorSpec.of("x", x),), (TensorSpec.of("y", y),))


def test_rewrites_are_exact_on_the_tiny_dit_step():
    import s2dit_deploy as sd

    stage = build_stages(sd.load_pipeline("s2dit-tiny"), ("dit_step",))["dit_step"]
    new, _example, counts, host = rewrite_for_qnn(stage.module, stage.example_inputs, stage.input_names)
    assert counts["depthwise_conv3d_to_conv2d"] > 0 and counts["unpatchify_rank5"] == 1
    assert counts["explicit_attention"] > 0
    assert host["t"]["kind"] == "timestep_features"
    gen = torch.Generator().manual_seed(0)
    named = dict(zip(stage.input_names, stage.example_inputs))
    for name in named:  # softmax K/V caches with content, so masking them matters
        if name.endswith((".k", ".v")):
            named[name] = torch.randn(named[name].shape, generator=gen)
    named["t"] = torch.tensor([0.6180339])
    valid = torch.zeros_like(named["cache.window_valid"])
    valid[0] = 1.0  # a half-filled window: the multiplicative slot mask must equal the additive one
    named["cache.window_valid"] = valid
    ref = stage.run_float(named)
    with torch.no_grad():
        got = new(*apply_host_inputs(host, named).values())
    for name, g in zip(stage.output_names, got):
        err = (ref[name] - g).abs().max() / ref[name].abs().max().clamp_min(1e-6)
        assert err < 1e-5, (name, float(err))
    assert not any(isinstance(m, nn.Conv3d) and m.groups > 1 for m in new.modules())


def test_unknown_soc_and_precision_are_clear(qnn, toy, tmp_path):
    from s2dit_deploy.targets.qnn.lower import supported_socs

    assert {"SM8650", "SM8750", "SM8850"} <= set(supported_socs())
    with pytest.raises(ValueError, match="SM8750"):
        qnn.compile(toy, None, tmp_path, {"soc": "SM0000"})
    with pytest.raises(ValueError, match="8a8w"):
        qnn.compile(toy, QuantPreset("3a3w"), tmp_path, {})
    with pytest.raises(ValueError, match="--quant"):  # precision is compute precision, not a preset
        qnn.compile(toy, None, tmp_path, {"precision": "8a8w"})
    with pytest.raises(ValueError, match="calibration"):
        qnn.compile(toy, QuantPreset("8a8w"), tmp_path, {})
    with pytest.raises(ValueError, match="act_observer"):
        qnn.compile(toy, QuantPreset("8a8w"), tmp_path, {"act_observer": "median"})


def _psnr(runner, stage, xs):
    got = np.concatenate([runner.run({"x": x.numpy()})["y"].ravel() for x in xs])
    ref = np.concatenate([stage.module(x)[0].detach().numpy().ravel() for x in xs])
    return psnr(ref, got)


@pytest.mark.parametrize("precision,floor", [("fp16", 50.0), ("8a8w", 30.0)])
def test_toy_stage_fully_delegated_and_accurate(qnn, toy, tmp_path, precision, floor):
    torch.manual_seed(1)
    xs = [torch.randn(1, 48, 16) for _ in range(4)]
    opts = {"soc": "SM8750", "calibration": {"toy": [{"x": x} for x in xs]}, "profile": precision == "fp16"}
    art = qnn.compile(toy, None if precision == "fp16" else QuantPreset(precision), tmp_path, opts)
    # the artifact records what was built: a quantized graph is never built with use_fp16
    assert art.metadata["use_fp16"] is (precision == "fp16") and art.quant["use_fp16"] is (precision == "fp16")
    assert art.metadata["quant"] == (None if precision == "fp16" else precision)
    part = art.metadata["partition"]
    assert part["delegated_fraction"] == 1.0 and part["fallbacks"] == [], part
    assert art.metadata["htp_arch"] == 79 and (tmp_path / art.files[0]).stat().st_size > 0
    if art.metadata["qnn_libraries"]["interposer"]:
        assert part["htp_configs_repacked"] >= 1
    runner = qnn.load(art, tmp_path)
    g = torch.Generator().manual_seed(2)  # held out: the calibration inputs come from seed 1
    held_out = [torch.randn(1, 48, 16, generator=g) for _ in range(4)]
    assert _psnr(runner, toy, held_out) >= floor
    if opts["profile"]:  # QNN profiling events from the HTP emulator, labelled as such
        events = runner.emulator_profile(tmp_path / "prof")
        assert any("cycles" in e["name"] for e in events)
        assert all("emulator" in e["source"] and "phone" in e["source"] for e in events)


def _toy_plan():
    from s2dit_deploy.quant.plan import LayerQuant, QuantPlan

    layers = {"lin": LayerQuant("int4-pc", "int16", (-4.0, 4.0)), "local": LayerQuant("int8-pc", "int8", (-4.0, 4.0))}
    return QuantPlan("toy-mixed", "toy", {"toy": layers}, "executorch-qnn")


def test_plan_translation_gives_each_layer_its_bits(qnn, toy):
    from s2dit_deploy.quant.qnn import apply_plan
    from s2dit_deploy.targets.qnn.rewrite import rewrite_for_qnn
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    module, example, _, _ = rewrite_for_qnn(toy.module, toy.example_inputs, toy.input_names)
    gm = torch.export.export(module, example, strict=True).module()
    prepared = prepare_pt2e(gm, apply_plan(_toy_plan(), stage=toy, soc="SM8750"))
    weight_bits = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and "activation_post_process" in node.target:
            obs = getattr(prepared, node.target)
            user = next(iter(node.users), None)
            src = node.args[0]
            if src.op == "get_attr" and user is not None and obs.quant_max < 2**31 - 1:  # not a bias
                weight_bits[user.name] = (obs.quant_min, obs.quant_max)
    lin = [v for k, v in weight_bits.items() if k.startswith("linear")]
    conv = [v for k, v in weight_bits.items() if k.startswith("conv")]
    assert lin and all(v[1] == 7 for v in lin), weight_bits  # int4 weights
    assert len(conv) == 2 and all(v[1] == 127 for v in conv), weight_bits  # int8 on both conv taps


def test_plan_compiles_delegated_and_accurate(qnn, toy, tmp_path):
    torch.manual_seed(1)
    xs = [torch.randn(1, 48, 16) for _ in range(4)]
    art = qnn.compile(toy, _toy_plan(), tmp_path, {"calibration": {"toy": [{"x": x} for x in xs]}})
    assert art.metadata["partition"]["delegated_fraction"] == 1.0
    assert art.quant["translation"]["layers"] == {"16a4w": 1, "8a8w": 1}
    g = torch.Generator().manual_seed(2)  # held out: the calibration inputs come from seed 1
    held_out = [torch.randn(1, 48, 16, generator=g) for _ in range(4)]
    assert _psnr(qnn.load(art, tmp_path), toy, held_out) >= 25.0


def test_plan_with_illegal_schemes_is_clear(qnn, toy, tmp_path):
    from s2dit_deploy.quant.plan import LayerQuant, QuantPlan

    plan = QuantPlan("bad", "toy", {"toy": {"lin": LayerQuant("int4-b32", "int8", (-1.0, 1.0))}})
    with pytest.raises(ValueError, match="executorch-qnn cannot run"):
        qnn.compile(toy, plan, tmp_path, {"calibration": {"toy": [{"x": toy.example_inputs[0]}]}})


class Rank8(nn.Module):
    """A rank-8 permute (what the stock DiT unpatchify does): HTP tensors stop at rank 5."""

    def forward(self, x):
        y = x.view(1, 2, 2, 2, 2, 2, 2, 4).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return (y.reshape(1, 8, 32) * 2.0,)


def test_fallbacks_are_reported_with_reasons(qnn, tmp_path):
    mod = Rank8().eval()
    x = torch.randn(1, 8, 32)
    stage = Stage("rank8", mod, (x,), (TensorSpec.of("x", x),), (TensorSpec.of("y", mod(x)[0]),))
    art = qnn.compile(stage, None, tmp_path, {"soc": "SM8650"})
    part = art.metadata["partition"]
    assert part["delegated_fraction"] < 1.0
    permute = [f for f in part["fallbacks"] if "permute" in f["op"]]
    assert permute and permute[0]["reason"]
    assert any("Rank" in m for m in part["qnn_messages"]), part["qnn_messages"]
    runner = qnn.load(art, tmp_path)  # partially delegated programs still run (portable kernels)
    np.testing.assert_allclose(runner.run({"x": x.numpy()})["y"], mod(x)[0].numpy(), rtol=1e-2, atol=1e-2)
