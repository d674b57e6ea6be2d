"""Issue 16 (items 1, 4, 5, 6, 17): compile never replaces what is not ours, swaps are atomic and
serialized, a bundle is untrusted input, every artifact is smoke-run before commit."""

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from s2dit_deploy import compiler
from s2dit_deploy.bundle import (Artifact, BundleError, atomic_bundle, check_output_path, load_bundle,
                                 sha256_path)
from s2dit_deploy.errors import CompileCheckError, InputError, OutputExistsError
from s2dit_deploy.targets.base import BaseTarget

CTX = mp.get_context("fork")


def _fill(b, payload=b"abc"):
    (b.path / "dit_step.bin").write_bytes(payload)
    b.artifacts["dit_step"] = Artifact("dit_step", "test", ["dit_step.bin"], {"inputs": [], "outputs": []})
    pkg = b.path / "decoder.mlpackage" / "Data"
    pkg.mkdir(parents=True)
    (pkg / "weights.bin").write_bytes(b"w")
    b.artifacts["decoder"] = Artifact("decoder", "test", ["decoder.mlpackage"], {"inputs": [], "outputs": []})
    (b.path / "quant").mkdir()
    (b.path / "quant" / "report.json").write_text("{}")


def _bundle(tmp_path, name="b"):
    with atomic_bundle(tmp_path / name, "test", {"name": "m"}) as b:
        _fill(b)
    return tmp_path / name


def _edit(bundle_dir, fn):
    mf = bundle_dir / "manifest.json"
    data = json.loads(mf.read_text())
    fn(data)
    mf.write_text(json.dumps(data))


# ------------------------------------------------------------------ item 1: output path safety

def _no_model_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")
    monkeypatch.setattr(compiler, "load_pipeline", boom)
    monkeypatch.setattr(compiler, "resolve", boom)


def test_compile_refuses_a_folder_of_user_files_before_loading_anything(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match=r"mine.*--force") as exc:
        compiler.compile_model("s2dit-tiny", target="onnx", out_dir=tmp_path / "mine", progress=False)
    assert exc.value.exit_code == 3
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_compile_refuses_a_file_the_cwd_and_its_parents(tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="existing file.*--force"):
        compiler.compile_model("s2dit-tiny", target="onnx", out_dir=tmp_path / "notes.txt", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep"
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.py").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", work, "..", "/", Path.home()):
        for force in (False, True):  # --force never replaces these
            with pytest.raises(OutputExistsError, match="refusing to replace it even with --force"):
                compiler.compile_model("s2dit-tiny", target="onnx", out_dir=out, force=force, progress=False)
    assert (work / "a.py").read_text() == "x"


def test_empty_folder_existing_bundle_and_force_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_path(tmp_path / "empty") == tmp_path / "empty"
    _bundle(tmp_path)
    assert check_output_path(tmp_path / "b") == tmp_path / "b"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "old.txt").write_text("x")
    with atomic_bundle(tmp_path / "mine", "test", {"name": "new"}, force=True) as b:
        _fill(b)
    assert not (tmp_path / "mine" / "old.txt").exists()
    assert load_bundle(tmp_path / "mine").model["name"] == "new"
    # re-compiling over an existing bundle needs no --force
    with atomic_bundle(tmp_path / "b", "test", {"name": "again"}) as b:
        _fill(b, b"new")
    assert load_bundle(tmp_path / "b").model["name"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "empty", "mine"]


def test_unwritable_parent_is_an_input_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a writable folder"):
        check_output_path(tmp_path / "file" / "b")
    if os.getuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(InputError, match="not a writable folder"):
            check_output_path(ro / "b")


# ------------------------------------------------------------------ item 6: untrusted bundle

def test_manifest_holds_every_file_with_a_hash(tmp_path):
    b = load_bundle(_bundle(tmp_path))
    assert set(b.files) == {"quant/report.json"}
    assert b.artifacts["decoder"].sha256["decoder.mlpackage"] == sha256_path(tmp_path / "b" / "decoder.mlpackage")
    assert b.file("dit_step") == tmp_path / "b" / "dit_step.bin"
    b.artifacts["dit_step"].files = ["../../etc/passwd"]  # the accessor targets use checks again
    with pytest.raises(BundleError, match="normalized relative path"):
        b.artifacts["dit_step"].path(b.path)


@pytest.mark.parametrize("entry,match", [
    ("../outside.bin", "normalized relative path"),
    ("ABS", "normalized relative path"),
    ("./dit_step.bin", "normalized relative path|malformed"),
    ("sub/../dit_step.bin", "normalized relative path|malformed"),
])
def test_path_traversal_and_absolute_paths_are_rejected(tmp_path, entry, match):
    bdir = _bundle(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    entry = str(outside) if entry == "ABS" else entry

    def point(d):
        d["artifacts"]["dit_step"]["files"] = [entry]
        d["artifacts"]["dit_step"]["sha256"] = {entry: sha256_path(outside)}
    _edit(bdir, point)
    with pytest.raises(BundleError, match=match):
        load_bundle(bdir, verify=False)  # even without hashing, no path leaves the bundle


def test_symlinks_are_rejected(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"abc")  # same bytes, same hash as the real file
    bdir = _bundle(tmp_path)
    (bdir / "dit_step.bin").unlink()
    (bdir / "dit_step.bin").symlink_to(secret)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(bdir, verify=False)
    (bdir / "dit_step.bin").unlink()
    (bdir / "dit_step.bin").write_bytes(b"abc")
    (bdir / "decoder.mlpackage" / "Data" / "weights.bin").unlink()
    (bdir / "decoder.mlpackage" / "Data" / "weights.bin").symlink_to(secret)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(bdir, verify=False)


def test_symlinked_parent_folder_is_rejected(tmp_path):
    bdir = _bundle(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (bdir / "decoder.mlpackage").rename(elsewhere)
    (bdir / "decoder.mlpackage").symlink_to(elsewhere)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(bdir)


def test_missing_hash_is_rejected(tmp_path):
    bdir = _bundle(tmp_path)
    _edit(bdir, lambda d: d["artifacts"]["dit_step"].update(sha256={}))
    with pytest.raises(BundleError, match="no hash for 'dit_step.bin'"):
        load_bundle(bdir)
    bdir = _bundle(tmp_path, "c")
    _edit(bdir, lambda d: d["artifacts"]["dit_step"].pop("sha256"))
    with pytest.raises(BundleError, match=r"\$\.artifacts\.dit_step.*'sha256' is a required property"):
        load_bundle(bdir)


@pytest.mark.parametrize("doc,match", [
    ([1, 2], r"\$ must be a JSON object"),
    (None, r"\$ must be a JSON object"),
    ("PATCH_LIST", r"\$\.artifacts.*not of type 'object'"),
    ("PATCH_SHAPE", r"\$\.artifacts\.dit_step\.contract\.outputs\[0\]\.shape.*not of type 'array'"),
    ("PATCH_FILES", r"\$\.files.*not of type 'object'"),
])
def test_malformed_manifests_name_the_json_path(tmp_path, doc, match):
    bdir = _bundle(tmp_path)
    data = json.loads((bdir / "manifest.json").read_text())
    if doc == "PATCH_LIST":
        data["artifacts"] = list(data["artifacts"].values())
    elif doc == "PATCH_SHAPE":
        data["artifacts"]["dit_step"]["contract"]["outputs"] = [{"name": "v", "shape": "1x2", "dtype": "f"}]
    elif doc == "PATCH_FILES":
        data["files"] = ["quant/report.json"]
    else:
        data = doc
    (bdir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=match):
        load_bundle(bdir)


def test_quant_files_are_verified_and_unlisted_files_rejected(tmp_path):
    bdir = _bundle(tmp_path)
    (bdir / "quant" / "report.json").write_text('{"psnr": 99}')
    with pytest.raises(BundleError, match="report.json does not match its manifest hash"):
        load_bundle(bdir)
    (bdir / "quant" / "report.json").write_text("{}")
    load_bundle(bdir)
    (bdir / "quant" / "extra.onnx_data").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.onnx_data is not listed"):
        load_bundle(bdir)


def test_format_1_bundle_asks_to_recompile(tmp_path):
    bdir = _bundle(tmp_path)
    _edit(bdir, lambda d: d.update(format_version=1))
    with pytest.raises(BundleError, match="format 1, this version reads format 2: recompile"):
        load_bundle(bdir)
    assert issubclass(BundleError, InputError)


# ------------------------------------------------------------------ item 5: stale partials, concurrency

def _killed_compile(out):
    with atomic_bundle(out, "test", {"name": "killed"}) as b:
        _fill(b)
        os.kill(os.getpid(), signal.SIGKILL)


def _live_compile(out, started, release):
    with atomic_bundle(out, "test", {"name": "live"}) as b:
        _fill(b)
        started.set()
        release.wait(30)
        raise SystemExit(0)  # leave without committing


def _partials(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if ".partial." in p.name)


def test_stale_partial_of_a_killed_compile_is_removed_but_a_live_one_is_not(tmp_path):
    out = tmp_path / "b"
    started, release = CTX.Event(), CTX.Event()
    live = CTX.Process(target=_live_compile, args=(out, started, release))
    live.start()
    try:
        assert started.wait(30)
        live_partial = _partials(tmp_path)
        assert len(live_partial) == 1
        p = CTX.Process(target=_killed_compile, args=(out,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert len(_partials(tmp_path)) == 2  # the killed compile's partial is left behind
        _bundle(tmp_path)  # a later compile to the same place
        assert _partials(tmp_path) == live_partial  # the dead one went, the live one stayed
    finally:
        release.set()
        live.join(30)
    assert _partials(tmp_path) == []
    assert load_bundle(out).model["name"] == "m"


def _racer(out, barrier, tag):
    with atomic_bundle(out, "test", {"name": tag}) as b:
        _fill(b, tag.encode())
        barrier.wait(30)


def test_concurrent_finishers_leave_one_good_bundle_and_no_old_folders(tmp_path):
    out = tmp_path / "b"
    _bundle(tmp_path)  # an old bundle both racers replace
    barrier = CTX.Barrier(4)
    procs = [CTX.Process(target=_racer, args=(out, barrier, f"r{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    assert load_bundle(out).model["name"] in {"r0", "r1", "r2", "r3"}


# ------------------------------------------------------------------ item 17: portable manifest, per-stage RSS

def test_checkpoint_record_holds_no_path(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "checkpoint_digest", lambda f: "a" * 64)
    folder = tmp_path / "my-ckpt"
    rec = compiler.checkpoint_record(str(folder), None, folder)
    assert rec == {"source": "user", "name": "my-ckpt", "sha256": "a" * 64}
    assert compiler.checkpoint_record("s2dit-tiny", None, None) == {"source": "seeded", "name": None, "sha256": None}


def test_rss_sampler_measures_the_stage_not_the_process():
    with compiler.RssSampler() as big:
        block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del block
    with compiler.RssSampler() as small:
        np.zeros(10).sum()
    assert big.increase_mb > 150
    assert small.increase_mb < 50  # the process-wide peak is already >= 200 MiB higher


def test_tiny_onnx_compile_is_portable_and_smoke_run(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    bundle = compiler.compile_model("s2dit-tiny", target="onnx", out_dir="out", progress=False)
    text = (tmp_path / "out" / "manifest.json").read_text()
    for secret in (str(tmp_path), str(Path(__file__).resolve().parents[1]), str(Path.home())):
        assert secret not in text
    assert bundle.model["checkpoint"]["source"] == "seeded"
    for info in bundle.info["compile"].values():
        assert info["smoke_run"] == "ok"
        assert info["rss_increase_mb"] >= 0 and info["process_peak_rss_mb"] > 0
    load_bundle(tmp_path / "out")


# ------------------------------------------------------------------ item 4: smoke run before commit

class _NanRunner:
    def __init__(self, contract, bad):
        self.contract, self.bad = contract, bad

    def run(self, inputs):
        outs = {o["name"]: np.zeros(o["shape"], np.float32) for o in self.contract["outputs"]}
        name = self.contract["outputs"][0]["name"]
        if self.bad == "nan":
            outs[name][...] = np.nan
        elif self.bad == "shape":
            outs[name] = np.zeros((1,), np.float32)
        elif self.bad == "missing":
            del outs[name]
        return outs


class _FakeTarget(BaseTarget):
    name = "fake"

    def __init__(self, bad):
        self.bad = bad

    def prepare(self, pipe, plan, stages, options):
        return dict(options)

    def compile(self, stage, plan, out_dir, options):
        (Path(out_dir) / f"{stage.name}.bin").write_bytes(b"x")
        return Artifact(stage.name, self.name, [f"{stage.name}.bin"], stage.contract())

    def load(self, artifact, bundle_dir, *, profile=False):
        return _NanRunner(artifact.contract, self.bad)


@pytest.mark.parametrize("bad,match", [("nan", "non-finite"), ("shape", "has shape"), ("missing", "no output")])
def test_smoke_run_failure_removes_the_partial(tmp_path, monkeypatch, bad, match):
    from s2dit_deploy.targets import base

    monkeypatch.setattr(base, "get_target", lambda name: _FakeTarget(bad))
    with pytest.raises(CompileCheckError, match=f"stage text_encoder: .*{match}") as exc:
        compiler.compile_model("s2dit-tiny", target="fake", out_dir=tmp_path / "b",
                               stages=("text_encoder",), progress=False)
    assert exc.value.exit_code == 6
    assert list(tmp_path.iterdir()) == []


def test_plan_mismatch_fails_the_compile(tmp_path):
    class Mismatch(_FakeTarget):
        def check_plan(self, artifact, bundle_dir, plan):
            return ["dit.blocks.0.attn.qkv: planned int4, built int8"]

    stage = type("S", (), {"name": "dit_step"})()
    with pytest.raises(CompileCheckError, match="does not match the quantization plan: dit.blocks.0"):
        compiler.smoke_run(Mismatch("ok"), stage, None, tmp_path, plan=object())
