"""Atomic bundles: nothing half-written on failure, hashes catch tampering, clear errors."""

import json

import pytest

from s2dit_deploy.bundle import Artifact, BundleError, atomic_bundle, load_bundle
from s2dit_deploy.targets.base import TargetUnavailable, get_target


def _write(bundle, stage, payload=b"abc"):
    (bundle.path / f"{stage}.bin").write_bytes(payload)
    bundle.artifacts[stage] = Artifact(stage, "test", [f"{stage}.bin"], {"inputs": [], "outputs": []})


def test_successful_bundle_has_manifest_with_hashes(tmp_path):
    with atomic_bundle(tmp_path / "b", "test", {"name": "m"}) as b:
        _write(b, "dit_step")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.artifacts["dit_step"].sha256["dit_step.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_failed_compile_leaves_nothing_and_keeps_the_old_bundle(tmp_path):
    with atomic_bundle(tmp_path / "b", "test", {"name": "old"}) as b:
        _write(b, "dit_step", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_bundle(tmp_path / "b", "test", {"name": "new"}) as b:
            _write(b, "dit_step", b"new")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert load_bundle(tmp_path / "b").model["name"] == "old"


def test_a_stage_that_forgets_its_file_fails_the_bundle(tmp_path):
    with pytest.raises(BundleError, match="did not write"):
        with atomic_bundle(tmp_path / "b", "test", {}) as b:
            b.artifacts["x"] = Artifact("x", "test", ["x.bin"], {})
    assert not (tmp_path / "b").exists()


def test_tampered_or_missing_files_are_detected(tmp_path):
    with atomic_bundle(tmp_path / "b", "test", {}) as b:
        _write(b, "decoder")
    (tmp_path / "b" / "decoder.bin").write_bytes(b"abd")
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "decoder.bin").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(tmp_path / "b")


def test_not_a_bundle_and_corrupt_manifest(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "target": "x", "model": {}, "artifacts": {}}))
    with pytest.raises(BundleError, match="format 99"):
        load_bundle(tmp_path)


def test_unknown_target_name():
    with pytest.raises((KeyError, ValueError), match="unknown target 'tpu'.*coreml"):  # now a UsageError
        get_target("tpu")
    assert issubclass(TargetUnavailable, RuntimeError)
