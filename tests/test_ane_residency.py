"""ANE residency report: each rule fires on a program built to break it, and the converted,
rewritten s2dit-tiny DiT step is predicted fully on the ANE while the stock one is not."""

import json

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from s2dit_deploy.analysis.ane_residency import analyze, to_markdown, write_report
from s2dit_deploy.analysis.ane_rules import RULES

IOS18 = ct.target.iOS18


def _prog(specs, fn):
    return mb.program(input_specs=specs, opset_version=IOS18)(fn)


def _rules(prog) -> dict:
    return analyze(prog)["summary"]["rule_hits"]


def test_every_rule_has_a_source():
    assert len({r.id for r in RULES}) == len(RULES)
    assert all(r.source and r.description for r in RULES)


def test_clean_fp16_conv2d_is_on_ane():
    w = np.random.rand(8, 4, 1, 1).astype(np.float16)
    prog = _prog([mb.TensorSpec((1, 4, 1, 64), types.fp16)], lambda x: mb.relu(x=mb.conv(x=x, weight=w)))
    rep = analyze(prog)
    assert rep["summary"]["flop_share_ane"] == 1.0 and rep["summary"]["rule_hits"] == {}
    assert rep["summary"]["flops"] == 2 * 8 * 64 * 4 + 8 * 64  # conv MACs x2 + one per relu output


def test_conv3d_and_rank5_are_off_ane():
    w = np.random.rand(4, 4, 1, 3, 3).astype(np.float16)
    prog = _prog([mb.TensorSpec((1, 4, 2, 8, 8), types.fp16)], lambda x: mb.conv(x=x, weight=w))
    hits = _rules(prog)
    assert hits.get("conv3d") == 1 and hits.get("rank_gt_4") == 1
    assert analyze(prog)["summary"]["rank5_tensors"] == 2


def test_fp32_gather_oversized_and_unknown_ops():
    assert "fp32_compute" in _rules(_prog([mb.TensorSpec((1, 8), types.fp32)], lambda x: mb.relu(x=x)))
    table = np.random.rand(100, 8).astype(np.float16)
    hits = _rules(_prog([mb.TensorSpec((1, 5), types.int32)], lambda i: mb.gather(x=table, indices=i, axis=0)))
    assert "gather" in hits and "integer_compute" in hits
    assert "oversized_dim" in _rules(_prog([mb.TensorSpec((1, 20000), types.fp16)], lambda x: mb.relu(x=x)))
    assert "unsupported_op" in _rules(_prog([mb.TensorSpec((1, 8), types.fp16)], lambda x: mb.sin(x=x)))


def test_blockwise_weight_quantization_is_off_ane_per_channel_is_not():
    data = np.random.randint(-8, 8, (16, 32)).astype(np.int8)

    def make(scale_shape):
        scale = (np.random.rand(*scale_shape) + 0.5).astype(np.float16)

        def fn(x):
            w = mb.constexpr_blockwise_shift_scale(data=data, scale=scale)
            return mb.linear(x=x, weight=w)
        return _prog([mb.TensorSpec((1, 32), types.fp16)], fn)

    assert "blockwise_weight_quant" in _rules(make((16, 4)))  # blocks of 8 along the input axis
    assert "blockwise_weight_quant" not in _rules(make((16, 1)))  # per output channel


def test_rewritten_tiny_dit_step_is_predicted_on_ane(tmp_path):
    from tests.coreml_helpers import compiled

    _, art, out = compiled("dit_step")
    rep = analyze(out / art.files[0], title="tiny dit_step rewritten")
    s = rep["summary"]
    assert s["rank5_tensors"] == 0 and s["max_rank"] <= 4
    assert s["flop_share_ane"] >= 0.999, s["rule_hits"]
    assert "conv3d" not in s["rule_hits"] and "fused_sdpa" not in s["rule_hits"]
    jp, mp = write_report(rep, tmp_path / "res")
    assert json.loads(jp.read_text())["summary"]["ops"] == s["ops"]
    assert "FLOP share on ANE" in mp.read_text() and "| rule |" in to_markdown(rep)


def test_stock_tiny_decoder_is_not(tmp_path):
    """Without the rewrite the decoder keeps Conv3d and rank-5 tensors: the report must say so."""
    from tests.coreml_helpers import compiled

    _, art, out = compiled("decoder", (("rewrite", "false"),))
    s = analyze(out / art.files[0])["summary"]
    assert s["rule_hits"].get("conv3d", 0) > 0 and s["rank5_tensors"] > 0
    assert s["flop_share_ane"] < 0.5
    _, art2, out2 = compiled("decoder")
    s2 = analyze(out2 / art2.files[0])["summary"]
    assert s2["rank5_tensors"] == 0 and s2["flop_share_ane"] >= 0.999, s2["rule_hits"]
