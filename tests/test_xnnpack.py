"""executorch-xnnpack target on a small stage that has every op family the S2DiT stages use.

The toy stage (Conv3d patch embed + causal depthwise Conv3d, LayerNorm, masked SDPA, GELU MLP)
compiles in seconds; the model-level round trip lives in test_host_xnnpack.py.
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("executorch")

from s2dit_deploy.stages import Stage, TensorSpec  # noqa: E402
from s2dit_deploy.targets.base import get_target  # noqa: E402
from s2dit_deploy.targets.xnnpack.passes import (  # noqa: E402
    Conv3dAsConv2d,
    LinearLayerNorm,
    SdpaAsMatmuls,
    var_mean_explicit,
)
from s2dit_deploy.targets.xnnpack.runtime import RunnerInputError  # noqa: E402
from s2dit_deploy.targets.xnnpack.target import XnnpackOptionError  # noqa: E402
from s2dit_deploy.fidelity import psnr  # noqa: E402

TARGET = get_target("executorch-xnnpack")


class ToyStep(nn.Module):
    """x (1, 4, 3, 8, 8) + mask (24,) + cache (1, 32, 2, 4, 4) -> y (1, 24, 32), tail."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
        self.local = nn.Conv3d(32, 32, (3, 3, 3), padding=(0, 1, 1), groups=32)
        self.norm = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.out_norm = nn.LayerNorm(32, elementwise_affine=False)

    def forward(self, x, mask, cache):
        y = self.embed(x)                                           # (1, 32, 3, 4, 4)
        y = self.local(torch.cat([cache, y], dim=2)) + y
        tail = torch.cat([cache, y], dim=2)[:, :, -2:]
        tok = y.flatten(2).transpose(1, 2)                          # (1, 48, 32)
        q, k, v = self.qkv(self.norm(tok)).reshape(1, 48, 3, 2, 16).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, :])
        tok = tok + a.transpose(1, 2).reshape(1, 48, 32)
        return self.out_norm(tok + self.mlp(tok)), tail


def toy_stage(seed: int = 0) -> Stage:
    torch.manual_seed(seed)
    mod = ToyStep().eval()
    x, cache = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 32, 2, 4, 4)
    mask = torch.zeros(48)
    mask[:8] = -1e4
    with torch.no_grad():
        outs = mod(x, mask, cache)
    ins = (TensorSpec.of("x", x), TensorSpec.of("mask", mask), TensorSpec.of("cache.tail", cache))
    return Stage("toy", mod, (x, mask, cache), ins, (TensorSpec.of("y", outs[0]), TensorSpec.of("entry.tail", outs[1])),
                 (("cache.tail", "entry.tail"),))


def calib(stage: Stage, n: int = 8, seed: int = 1) -> list[dict]:
    """Calibration inputs (seed 1); a quantized artifact is scored on another seed's (held out)."""
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(1, 4, 3, 8, 8, generator=g), "mask": stage.example_inputs[1],
             "cache.tail": torch.randn(1, 32, 2, 4, 4, generator=g)} for _ in range(n)]


def check_psnr(stage, runner, inputs) -> dict[str, float]:
    ref = stage.run_float(inputs)
    got = runner.run({k: v.numpy() for k, v in inputs.items()})
    return {k: psnr(ref[k].numpy(), got[k]) for k in stage.output_names}


@pytest.fixture(scope="module")
def toy():
    return toy_stage()


def test_swaps_are_exact():
    torch.manual_seed(0)
    for conv in (nn.Conv3d(4, 6, (1, 2, 2), stride=(1, 2, 2)), nn.Conv3d(8, 8, 3, padding=(1, 1, 1), groups=8),
                 nn.Conv3d(3, 5, (2, 3, 1), stride=(2, 1, 1), padding=(0, 1, 0))):
        x = torch.randn(2, conv.in_channels, 5, 6, 6)
        torch.testing.assert_close(Conv3dAsConv2d(conv)(x), conv(x), atol=1e-5, rtol=1e-5)
    ln = nn.LayerNorm(24)
    nn.init.normal_(ln.weight)
    x = torch.randn(2, 7, 24) * 3 + 1
    torch.testing.assert_close(LinearLayerNorm(ln)(x), ln(x), atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)
    mask = torch.zeros(1, 10)
    mask[0, 3] = -1e4
    with SdpaAsMatmuls():
        mine = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(mine, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    var, mean = var_mean_explicit(x, dim=(1, 2), correction=0, keepdim=True)
    rv, rm = torch.var_mean(x, dim=(1, 2), correction=0, keepdim=True)
    torch.testing.assert_close((var, mean), (rv, rm))


def test_fp32_roundtrip_and_delegation(toy, tmp_path):
    art = TARGET.compile(toy, None, tmp_path, {})
    assert art.files == ["toy.pte"] and (tmp_path / "toy.pte").stat().st_size > 0
    assert art.contract == toy.contract() and art.quant["scheme"] == "none"
    d = art.metadata["delegation"]
    assert d["delegated_nodes"] > 0 and d["partitions"] >= 1
    # conv3d, layer norm and attention are all delegated: nothing of theirs falls back to portable ops
    assert not {"convolution.default", "native_layer_norm.default", "_softmax.default", "bmm.default",
                "var_mean.correction", "any.dim", "where.self"} & set(d["fallback_ops"]), d["fallback_ops"]
    assert art.metadata["swaps"]["conv3d_as_conv2d"] == 2 and art.metadata["swaps"]["layer_norm_as_linear"] == 2
    runner = TARGET.load(art, tmp_path)
    for inputs in calib(toy, 2):
        assert min(check_psnr(toy, runner, inputs).values()) >= 60.0


@pytest.mark.parametrize("scheme,floor", [("int8", 25.0), ("int8-dynamic", 30.0), ("8da4w", 20.0)])
def test_quantized_schemes(toy, tmp_path, scheme, floor):
    art = TARGET.compile(toy, None, tmp_path, {"xnnpack_quant": scheme, "calibration": {"toy": calib(toy)}})
    assert art.quant["scheme"] == scheme
    runner = TARGET.load(art, tmp_path)
    got = check_psnr(toy, runner, calib(toy, 1, seed=2)[0])  # held out: not a calibration input
    assert got["y"] >= floor, got
    assert got["y"] < 200  # it is really quantized (not bit-exact float)
    if scheme == "int8":
        assert art.quant["calibration_batches"] == 8


def test_bad_options(toy, tmp_path):
    with pytest.raises(XnnpackOptionError, match="int8-dynamic"):
        TARGET.compile(toy, None, tmp_path, {"xnnpack_quant": "int3"})
    with pytest.raises(XnnpackOptionError, match="does not take"):
        TARGET.compile(toy, None, tmp_path, {"xnnpack_qaunt": "int8"})
    with pytest.raises(XnnpackOptionError, match="calibration_batches"):
        TARGET.compile(toy, None, tmp_path, {"calibration_batches": 0})
    assert not list(tmp_path.iterdir())


def test_runner_checks_inputs(toy, tmp_path):
    art = TARGET.compile(toy, None, tmp_path, {})
    runner = TARGET.load(art, tmp_path)
    inputs = {k: v.numpy() for k, v in zip(toy.input_names, toy.example_inputs)}
    out = runner.run({**inputs, "x": inputs["x"].astype(np.float64)})  # cast to the contract dtype
    assert list(out) == ["y", "entry.tail"] and out["y"].dtype == np.float32
    with pytest.raises(RunnerInputError, match="missing"):
        runner.run({"x": inputs["x"]})
    with pytest.raises(RunnerInputError, match="static shapes"):
        runner.run({**inputs, "x": inputs["x"][:, :, :2]})
    prof = runner.profile(inputs, runs=2)
    assert prof["ops"] and prof["runs"] == 2
    assert any(op["delegate"] for op in prof["ops"])
