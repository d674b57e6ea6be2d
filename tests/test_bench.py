"""The benchmark harness on a small XNNPACK bundle: stats, labels, profiles, reports, CLI command."""

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("executorch")

from s2dit_deploy.bench import harness  # noqa: E402
from s2dit_deploy.bundle import atomic_bundle  # noqa: E402
from s2dit_deploy.commands import bench as bench_cmd  # noqa: E402
from s2dit_deploy.targets.base import get_target  # noqa: E402


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory):
    from tests.test_xnnpack import toy_stage

    out = tmp_path_factory.mktemp("bench") / "bundle"
    with atomic_bundle(out, "executorch-xnnpack", {"name": "toy", "config": {}}) as b:
        b.artifacts["toy"] = get_target("executorch-xnnpack").compile(toy_stage(), None, b.path, {})
    return out


def test_time_stats_and_interleaving():
    s = harness.time_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["n"] == 5
    assert s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] and s["iqr_ms"] == 2.0
    calls = []
    out = harness.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and out["a"]["n"] == 3
    with pytest.raises(ValueError, match="repeats"):
        harness.time_callable(lambda: None, repeats=0, warmup=0)


def test_synthetic_inputs_follow_the_contract():
    contract = {"inputs": [{"name": "input_ids", "shape": [1, 5], "dtype": "int32"},
                           {"name": "cache.window_valid", "shape": [2], "dtype": "float32"},
                           {"name": "x", "shape": [2, 3], "dtype": "float32"}]}
    got = harness.synthetic_inputs(contract)
    assert got["input_ids"].dtype == np.int32 and got["input_ids"].shape == (1, 5)
    assert (got["cache.window_valid"] == 1).all() and np.isfinite(got["x"]).all()


def test_bench_bundle_reports(toy_bundle, tmp_path):
    rep = harness.bench_bundle(toy_bundle, repeats=5, warmup=1, out_dir=tmp_path)
    st = rep["stages"]["toy"]
    assert st["n"] == 5 and 0 < st["p10_ms"] <= st["median_ms"] <= st["p90_ms"]
    assert st["label"].startswith("host CPU time") and "execute" in st["timed"]
    assert st["profile"]["ops"], st.get("profile_error")
    assert any(op["delegate"] for op in st["profile"]["ops"])
    assert json.loads((tmp_path / "bench.json").read_text())["stages"]["toy"]["median_ms"] == st["median_ms"]
    md = (tmp_path / "bench.md").read_text()
    assert "| toy |" in md and "per-operator profile" in md
    with pytest.raises(KeyError, match="no stage"):
        harness.bench_bundle(toy_bundle, stages=("decoder",))
    with pytest.raises(ValueError, match="device"):
        harness.bench_bundle(toy_bundle, device="iphone-16-pro-max")


def test_reference_executors_are_labelled():
    assert "not device time" in harness.TIME_LABELS["coreml"]
    assert "not phone time" in harness.TIME_LABELS["executorch-qnn"]


def test_bench_command(toy_bundle, tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench_cmd.add_parser(sub)
    args = parser.parse_args(["bench", str(toy_bundle), "--repeats", "3", "--warmup", "0", "--no-profile",
                              "--out", str(tmp_path)])
    args.json = True
    result, text = bench_cmd.run(args)
    assert result["stages"]["toy"]["n"] == 3 and "profile" not in result["stages"]["toy"]
    assert "| toy |" in text and (tmp_path / "bench.md").exists()
