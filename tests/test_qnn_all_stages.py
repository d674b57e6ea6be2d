"""Every stage compiles on executorch-qnn by default: QNN HTP first, XNNPACK for what QNN leaves,
portable CPU kernels last, all in one .pte, with the placement recorded.

The s2dit-small end-to-end test is the one heavy test here (several minutes on one core): it runs
only with S2DIT_QNN_SMALL=1. The others use s2dit-tiny or toy modules.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from s2dit_deploy.fidelity import psnr
from s2dit_deploy.stages import Stage, TensorSpec, build_stages
from s2dit_deploy.targets.base import QuantPreset
from s2dit_deploy.targets.floors import default_floors
from s2dit_deploy.targets.qnn.decompose import decompose_for_qnn
from s2dit_deploy.targets.qnn.placement import node_flops

PLACEMENT_KEYS = {"ops", "op_share_accelerator", "flop_share_accelerator", "fallbacks"}


@pytest.mark.parametrize("dim,correction,keepdim", [((2, 4), 0, True), (1, 1, False), (None, None, False),
                                                    ([-1], 0, False)])
def test_two_pass_var_mean_equals_torch(dim, correction, keepdim):
    class M(nn.Module):
        def forward(self, x):
            return torch.var_mean(x, dim=dim, correction=correction, keepdim=keepdim)

    x = torch.randn(2, 3, 4, 5, 6) * 3 + 1
    ep = torch.export.export(M(), (x,))
    out, counts = decompose_for_qnn(ep)
    assert counts == {"aten.var_mean.correction": 1}
    assert not any("var_mean" in str(n.target) for n in out.graph.nodes)
    for got, ref in zip(out.module()(x), M()(x)):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_flops_count_macs_of_convolutions_and_matmuls():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(4, 8, (3, 3, 3), padding=(0, 1, 1))
            self.lin = nn.Linear(8, 16)

        def forward(self, x):
            y = self.conv(x)  # (1, 8, 2, 5, 5)
            return self.lin(torch.relu(y).permute(0, 2, 3, 4, 1))

    ep = torch.export.export(M(), (torch.randn(1, 4, 4, 5, 5),))
    flops = {str(n.target).split(".")[1]: node_flops(n) for n in ep.graph.nodes if n.op == "call_function"}
    assert flops["conv3d"] == 2 * (8 * 2 * 5 * 5) * (4 * 27)
    assert flops["linear"] == 2 * (2 * 5 * 5 * 16) * 8
    assert flops["relu"] == 8 * 2 * 5 * 5 and flops["permute"] == 0


def _stage_psnr(runner, stage: Stage, calls: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    got = [runner.run({k: v.numpy() for k, v in c.items()}) for c in calls]
    ref = [stage.run_float(c) for c in calls]
    return {name: psnr(np.concatenate([r[name].numpy().ravel() for r in ref]),
                       np.concatenate([g[name].ravel() for g in got])) for name in stage.output_names}


def _random_calls(stage: Stage, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(a.shape, generator=gen) for name, a in zip(stage.input_names, stage.example_inputs)}
            for _ in range(n)]


def test_tiny_decoder_runs_whole_on_htp_after_decomposition(qnn, tmp_path):
    """The stock QNN flow kept the decoder's rank-5 hardswish un-decomposed and failed; now it is
    decomposed (HTP takes the pieces) and GroupNorm's var_mean too: one HTP graph, nothing on CPU."""
    import s2dit_deploy as sd

    stage = build_stages(sd.load_pipeline("s2dit-tiny"), ("decoder",))["decoder"]
    art = qnn.compile(stage, None, tmp_path, {"soc": "SM8750"})
    place = art.metadata["placement"]
    assert PLACEMENT_KEYS <= set(place) and set(place["ops"]) == {"htp", "xnnpack", "cpu"}
    assert place["fallbacks"] == [] and place["op_share_accelerator"] == 1.0, place
    assert place["flop_share_accelerator"] == 1.0 and place["subgraphs"]["htp"] == 1
    decomposed = {d["op"]: d for d in place["decomposed"]}
    assert decomposed["aten.hardswish.default"]["count"] == 9
    assert "Rank 5" in decomposed["aten.hardswish.default"]["reason"]  # QNN's own validation message
    assert decomposed["aten.var_mean.correction"]["count"] == 9
    floor = default_floors("executorch-qnn", art)["*"]
    for name, db in _stage_psnr(qnn.load(art, tmp_path), stage, _random_calls(stage, 1)).items():
        assert db >= floor, (name, db, floor)


class Tiers(nn.Module):
    """One op for each place: fmod (no QNN builder, no XNNPACK config: portable CPU kernel),
    a rank-6 permute (QNN stops at rank 5, XNNPACK takes it), the rest on HTP."""

    def forward(self, x):
        a = torch.fmod(x, 0.7)
        b = torch.relu(x).view(1, 2, 2, 2, 8, 4).permute(0, 2, 1, 3, 5, 4).reshape(1, 8, 32)
        return ((a * 2.0 + b) * 0.5,)


def test_each_tier_takes_what_the_one_before_left(qnn, tmp_path):
    mod = Tiers().eval()
    x = torch.randn(1, 8, 32)
    stage = Stage("tiers", mod, (x,), (TensorSpec.of("x", x),), (TensorSpec.of("y", mod(x)[0]),))
    art = qnn.compile(stage, None, tmp_path, {"soc": "SM8750"})
    place = art.metadata["placement"]
    assert all(place["ops"][p] > 0 for p in ("htp", "xnnpack", "cpu")), place
    assert 0.0 < place["op_share_accelerator"] < 1.0
    placed = {(f["op"], f["placed"]): f for f in place["fallbacks"]}
    assert "Rank 6" in placed[("aten.permute_copy.default", "xnnpack")]["reason"], place["fallbacks"]
    fmod = placed[("aten.fmod.Scalar", "cpu")]
    assert "No node visitor" in fmod["reason"] and "XNNPACK" in fmod["reason"], fmod
    assert all(f["count"] > 0 for f in place["fallbacks"])
    got = qnn.load(art, tmp_path).run({"x": x.numpy()})["y"]
    np.testing.assert_allclose(got, mod(x)[0].numpy(), rtol=1e-2, atol=1e-2)


class MiniDecoderBlock(nn.Module):
    """The decoder's ResBlock (per-frame GroupNorm, rank-5 hardswish, causal Conv3d) as a stage."""

    def __init__(self):
        super().__init__()
        from s2dit_deploy.model_zoo.decoder import ResBlock

        self.block = ResBlock(8, 4)

    def forward(self, x, s0, s1):
        y, (n0, n1) = self.block(x, [s0, s1])
        return y, n0, n1


def test_quantized_decoder_block_decomposes_before_quantizing(qnn, tmp_path):
    """Decomposed after PT2E, the hardswish pieces carry no quantization and fall off HTP (27 float
    ops on XNNPACK for the tiny decoder); decomposed before, HTP takes the whole quantized block."""
    torch.manual_seed(0)
    mod = MiniDecoderBlock().eval()
    ex = (torch.randn(1, 8, 2, 4, 4), torch.randn(1, 8, 2, 4, 4), torch.randn(1, 8, 2, 4, 4))
    names = ("x", "s0", "s1")
    outs = mod(*ex)
    stage = Stage("block", mod, ex, tuple(TensorSpec.of(n, a) for n, a in zip(names, ex)),
                  tuple(TensorSpec.of(n, a) for n, a in zip(("y", "n0", "n1"), outs)))
    calls = _random_calls(stage, 4)
    art = qnn.compile(stage, QuantPreset("8a8w"), tmp_path, {"calibration": {"block": calls}})
    place = art.metadata["placement"]
    assert place["fallbacks"] == [] and place["op_share_accelerator"] == 1.0, place
    decomposed = {d["op"]: d for d in place["decomposed"]}
    assert "before quantization" in decomposed["aten.hardswish.default"]["reason"]
    assert "aten.var_mean.correction" in decomposed
    floor = default_floors("executorch-qnn", art)["*"]
    assert _stage_psnr(qnn.load(art, tmp_path), stage, calls)["y"] >= floor


@pytest.mark.skipif(not os.environ.get("S2DIT_QNN_SMALL"),
                    reason="heavy (minutes): set S2DIT_QNN_SMALL=1 to compile all of s2dit-small for QNN")
def test_full_default_qnn_compile_of_s2dit_small(qnn, tmp_path):
    """`s2dit-deploy compile s2dit-small --target executorch-qnn --soc SM8750` with no --stages."""
    import s2dit_deploy as sd

    bundle = sd.compile("s2dit-small", target="executorch-qnn", out_dir=tmp_path / "b", soc="SM8750",
                        progress=False)
    assert set(bundle.artifacts) == {"text_encoder", "dit_step", "decoder"}
    for name, art in bundle.artifacts.items():
        place = art.metadata["placement"]
        assert PLACEMENT_KEYS <= set(place), name
        assert place["op_share_accelerator"] > 0.9 and place["flop_share_accelerator"] > 0.99, (name, place)
    report = sd.validate(bundle.path, num_chunks=1, max_calls=2)  # raises below the default floors
    assert report["passed"] and set(report["stages"]) == {"text_encoder", "dit_step", "decoder"}
