"""`s2dit-deploy export`: one command from a model to a report folder (bundle, validation, Table A3
estimate, plots, I/O contract), and the MIL reader the Core ML estimate uses."""

import json

import pytest

from .test_cli import run_cli

pytest.importorskip("coremltools", reason="coremltools is not installed")


@pytest.fixture
def exported(tiny_coreml_export):
    return tiny_coreml_export


def test_export_writes_a_complete_report_folder(exported):
    out, summary = exported
    names = {p.name for p in out.iterdir()}
    assert {"bundle", "validation.json", "validation.md", "device_estimate.json", "device_estimate.md",
            "device_estimate.png", "io_contract.json", "REPORT.md", "summary.json"} <= names
    assert summary["target"] == "coreml" and summary["validation"]["passed"]
    assert summary["fps_last_step"] > summary["fps_clean"] > 0
    assert (out / "bundle" / "manifest.json").is_file()
    contract = json.loads((out / "io_contract.json").read_text())
    assert set(contract) == {"text_encoder", "dit_step", "decoder"}
    assert all(c["inputs"] and c["outputs"] for c in contract.values())
    report = (out / "REPORT.md").read_text()
    assert "estimate (cost model v1" in report and "measured" not in report.replace("not measured", "")
    assert str(out.parent / f".{out.name}.export-tmp") not in report
    assert not any(p.name.endswith("export-tmp") for p in out.parent.iterdir())


def test_export_estimate_reads_the_mil_program(exported):
    out, _ = exported
    rep = json.loads((out / "device_estimate.json").read_text())
    assert rep["bundle_target"] == "coreml"
    for stage in rep["stages"].values():
        assert stage["origin"].startswith("MIL program") and stage["ops"] > 0 and stage["ms"] > 0


def test_mil_reader_finds_weights_and_compute(exported):
    from s2dit_deploy.bench.artifact_ops import bundle_stage_ops
    from s2dit_deploy.bundle import load_bundle

    ops, origin = bundle_stage_ops(load_bundle(exported[0] / "bundle"), "dit_step")
    kinds = {o.kind for o in ops}
    assert {"matmul", "attention", "vector", "layout"} <= kinds  # pointwise convs count as matmuls
    assert sum(o.weight_elems for o in ops if o.kind in ("matmul", "conv")) > 100_000
    assert sum(o.flops for o in ops) > 1e6


def test_export_refuses_to_overwrite_and_checks_the_device(exported, tmp_path):
    out, _ = exported
    r = run_cli("export", "s2dit-tiny", "--device", "iphone-16-pro-max", "-o", str(out), "--json")
    assert r.returncode == 3 and "--force" in json.loads(r.stdout)["message"]
    r = run_cli("export", "s2dit-tiny", "--device", "nokia-3310", "-o", str(tmp_path / "x"), "--json")
    assert r.returncode == 2 and "iphone-16-pro-max" in json.loads(r.stdout)["message"]
    assert not (tmp_path / "x").exists()
