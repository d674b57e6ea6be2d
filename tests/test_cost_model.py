"""The device cost model: roofline math, placement, quantized weights, the op tracer, the calibration
data and its fit, and `bench --device` from a model name and from a bundle."""

import json
import math

import pytest
import torch
from torch import nn

from s2dit_deploy.bench import calibration as C
from s2dit_deploy.bench.cost_model import PARAM_NAMES, CostParams, estimate_ops, family_params
from s2dit_deploy.bench.op_trace import Op, trace_ops
from s2dit_deploy.errors import UsageError
from s2dit_deploy.targets.devices import DeviceProfile, Unit, get_device, list_devices

from .test_cli import run_cli

# a device with round numbers: 10 TFLOPS fp16, 20 TOPS int8, 100 GB/s
DEV = DeviceProfile("test-phone", "Test", "T1", "test-family", "coreml", None, 100.0,
                    (("npu", Unit("npu", (("fp16", 10.0), ("int8", 20.0)), True, "")),
                     ("cpu", Unit("cpu", (("fp16", 0.1), ("fp32", 0.05)), True, ""))))
P = CostParams(eff_matmul=0.5, eff_conv=0.25, eff_attention=0.5, eff_vector=0.1, eff_int8=1.0, mem_eff=1.0,
               act_dram=1.0, op_overhead_us=10.0, boundary_us=100.0)


def test_roofline_matmul_by_hand():
    """(M=256, K=1024) x (K, N=1024) fp16: compute 2*M*K*N / (10e12 * 0.5) vs memory (K*N + M*K + M*N) * 2 B / 100e9."""
    m, k, n = 256, 1024, 1024
    op = Op("mm", "matmul", 2.0 * m * k * n, k * n, m * k + m * n)
    t_c = 2 * m * k * n / (10e12 * 0.5)
    t_m = (k * n + m * k + m * n) * 2 / 100e9
    est = estimate_ops([op], DEV, "fp16", params=P)
    assert est.seconds == pytest.approx(max(t_c, t_m) + 10e-6, rel=1e-9)
    assert est.top_ops[0]["bound"] == ("compute" if t_c > t_m else "memory")


def test_roofline_conv_by_hand_from_the_tracer():
    conv = nn.Conv2d(64, 128, 3, padding=1).to("meta")
    ops = trace_ops(conv, (torch.zeros(1, 64, 56, 56, device="meta"),))
    (op,) = [o for o in ops if o.kind == "conv"]
    assert op.flops == 2 * (128 * 56 * 56) * 64 * 9
    assert op.weight_elems == 128 * 64 * 9 + 128  # weight and bias
    assert op.act_elems == 64 * 56 * 56 + 128 * 56 * 56
    t_c = op.flops / (10e12 * 0.25)
    t_m = (op.weight_elems + op.act_elems) * 2 / 100e9
    assert estimate_ops([op], DEV, "fp16", params=P).seconds == pytest.approx(max(t_c, t_m) + 10e-6, rel=1e-9)


def test_placement_on_cpu_costs_more_and_adds_boundaries():
    ops = [Op("mm", "matmul", 2e9, 1_000_000, 10_000) for _ in range(3)]
    on_npu = estimate_ops(ops, DEV, "fp16", params=P)
    moved = [ops[0], ops[1].with_unit("cpu"), ops[2]]
    off = estimate_ops(moved, DEV, "fp16", params=P)
    assert off.seconds > on_npu.seconds * 5
    assert off.boundaries == 2 and on_npu.boundaries == 0
    assert 0 < off.off_npu_share < 1


def test_quantized_weights_lower_memory_time():
    gemv = [Op("mm", "matmul", 2.0 * 4096 * 4096, 4096 * 4096, 2 * 4096)]  # one token: memory bound
    t = {p: estimate_ops(gemv, DEV, p, params=P).seconds for p in ("fp16", "w8a16", "w4a16")}
    assert t["fp16"] > t["w8a16"] > t["w4a16"]
    assert (t["fp16"] - 10e-6) / (t["w8a16"] - 10e-6) == pytest.approx(2.0, rel=0.01)
    # int8 activations take the int8 peak where an op is compute bound
    big = [Op("mm", "matmul", 2.0 * 4096 ** 3, 4096 * 4096, 2 * 4096 * 4096)]
    assert estimate_ops(big, DEV, "w8a8", params=P).seconds < estimate_ops(big, DEV, "w8a16", params=P).seconds


def test_tracer_weights_views_and_lookups():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 64)
            self.fc = nn.Linear(64, 32)

        def forward(self, ids):
            h = self.emb(ids)
            return self.fc(h) @ self.fc.weight  # an activation x weight-view product is still a weight read

    with torch.device("meta"):
        m = M()
    ops = trace_ops(m, (torch.zeros(1, 7, dtype=torch.long, device="meta"),))
    emb = next(o for o in ops if o.name == "embedding")
    assert emb.weight_elems == 7 * 64  # the gathered rows, not the 1000-row table
    mms = [o for o in ops if o.kind == "matmul"]
    assert len(mms) == 2 and all(o.weight_elems >= 32 * 64 for o in mms)
    assert {o.group for o in mms} == {"fc", ""}


def test_devices_and_unknown_device_lists_known_ones():
    ids = {d.id for d in list_devices()}
    assert {"iphone-16-pro-max", "iphone-15-pro-max", "iphone-14-pro-max", "galaxy-s25", "galaxy-s24",
            "sm8850-phone"} <= ids
    for d in list_devices():
        assert d.bandwidth_gbs > 0 and all(u.source for _, u in d.units)
    with pytest.raises(UsageError, match="iphone-16-pro-max"):
        get_device("pixel-9")
    r = run_cli("bench", "s2dit-tiny", "--device", "pixel-9", "--json")
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert "galaxy-s25" in err["message"]


def test_calibration_file_parses_and_every_row_has_a_source(tmp_path):
    rows = C.load_rows()
    assert len(rows) >= 60
    assert len({r["id"] for r in rows}) == len(rows)
    assert not any(r["model"].startswith("s2dit") for r in rows)  # the S2DiT figures are held out
    data = json.loads(C.DATA_FILE.read_text())
    bad = dict(data, rows=[{**data["rows"][0], "source": {"repo": "quic/ai-hub-models"}}])
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="source"):
        C.load_rows(p)


def test_shipped_fit_matches_the_data():
    """The shipped factors were fitted on today's calibration rows (refit: `bench --fit-cost-model`)."""
    rows = C.load_rows()
    for fam in ("qualcomm-htp", "apple-ane"):
        params, info = family_params(fam)
        assert info["fitted"] and info["rows"] == len(C.family_rows(rows, fam))
        assert set(info) >= {"leave_one_model_out", "rows_per_device", "in_sample"}
        assert all(math.isfinite(v) and v > 0 for v in params.vector())
    assert len(PARAM_NAMES) == len(CostParams().vector())


def test_fit_and_leave_one_model_out_cross_validation_run():
    rows = [r for r in C.family_rows(C.load_rows(), "qualcomm-htp")
            if r["model"] in ("resnet18-224", "resnet50-224", "mobilenet-v2-224", "vit-b16-224")]
    assert len({r["model"] for r in rows}) == 4
    fitted = C.fit(rows)
    assert fitted != CostParams()
    loo = C.cross_validate(rows)
    assert {e["model"] for e in loo} == {r["model"] for r in rows}
    assert all(math.isfinite(e["error"]) and e["predicted_ms"] > 0 for e in loo)


def test_bench_device_from_a_model_name(tmp_path):
    r = run_cli("bench", "s2dit-tiny", "--device", "iphone-16-pro-max", "--precision", "w4a8-mixed",
                "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["label"].startswith("estimate (cost model v1")
    assert set(rep["stages"]) == {"text_encoder", "dit_step", "decoder"}
    clean, last = rep["commit_modes"]["clean"], rep["commit_modes"]["last-step"]
    assert clean["dit_calls_per_chunk"] == last["dit_calls_per_chunk"] + 1
    assert last["fps"] > clean["fps"] > 0
    assert len(rep["stages"]["dit_step"]["top_ops"]) == 10
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"device_estimate{suffix}").stat().st_size > 100
    assert "not measured" in (tmp_path / "device_estimate.md").read_text()
    again = run_cli("bench", "s2dit-tiny", "--device", "iphone-16-pro-max", "--out", str(tmp_path), "--json")
    assert again.returncode == 3  # nothing the user owns is overwritten without --force


def test_bench_device_bad_precision_is_named():
    r = run_cli("bench", "s2dit-tiny", "--device", "galaxy-s25", "--precision", "w3a3", "--json")
    assert r.returncode == 2 and "--precision" in json.loads(r.stdout)["message"]


def test_bench_device_from_a_bundle(tiny_xnnpack_bundle):
    from s2dit_deploy.bench.device_report import estimate, to_markdown

    rep = estimate(tiny_xnnpack_bundle, "galaxy-s25")
    assert rep["bundle_target"] == "executorch-xnnpack"
    assert all(s["ms"] > 0 for s in rep["stages"].values())
    assert "partition-record" in rep["stages"]["dit_step"]["origin"]
    assert {s["unit"] for s in rep["stages"].values()} == {"cpu"}  # XNNPACK runs on the phone's CPU
    assert rep["stages"]["dit_step"]["off_npu_share"] == 1.0
    assert "unfitted" in to_markdown(rep)


def test_precision_changes_the_model_estimate():
    from s2dit_deploy.bench.device_report import estimate

    fp16 = estimate("s2dit-tiny", "galaxy-s25", "fp16")["stages"]["dit_step"]["ms"]
    w4 = estimate("s2dit-tiny", "galaxy-s25", "w4a8-mixed")["stages"]["dit_step"]["ms"]
    assert w4 < fp16


def test_bench_device_reports_commit_fidelity_beside_fps():
    r = run_cli("bench", "s2dit-tiny", "--device", "galaxy-s25", "--commit-fidelity", "--fidelity-chunks", "2",
                "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    cf = json.loads(r.stdout)["commit_fidelity"]
    assert cf["dit_calls_per_chunk"] == {"clean": 5, "last-step": 4}
    assert cf["first_chunk_max_abs_diff"] == 0 and math.isfinite(cf["psnr_db"])
    bad = run_cli("bench", "s2dit-tiny", "--device", "galaxy-s25", "--commit-fidelity", "--fidelity-chunks", "1",
                  "--json")
    assert bad.returncode == 2 and "--fidelity-chunks" in json.loads(bad.stdout)["message"]


def test_sd_bench_stays_callable_after_the_bench_subpackage_is_imported():
    import s2dit_deploy as sd
    import s2dit_deploy.bench.harness  # noqa: F401  (sets the package attribute `bench`)

    first = sd.bench("s2dit-tiny", device="galaxy-s24")
    second = sd.bench("s2dit-tiny", device="galaxy-s24", precision="w8a8")
    assert first["stages"]["dit_step"]["ms"] > second["stages"]["dit_step"]["ms"] > 0
    assert sd.bench.harness.bench_bundle is not None
