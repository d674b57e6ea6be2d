"""The CLI contract: with --json, stdout is one strict JSON document on success and on every error,
and each error class has its documented exit code (s2dit_deploy/errors.py, docs/cli.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from s2dit_deploy import errors
from s2dit_deploy.cli import main


def strict(text: str):
    """json.loads that rejects NaN / Infinity."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails loudly: the command must have rejected its arguments before."""
    import s2dit_deploy.compiler as compiler
    import s2dit_deploy.model_zoo.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline, "load_pipeline", boom)
    monkeypatch.setattr(compiler, "load_pipeline", boom)
    monkeypatch.setattr(compiler, "compile_model", boom)


ERROR_CASES = {
    "unknown flag": (["models", "--bogus"], errors.EXIT_USAGE),
    "bad choice": (["compile", "--target", "nope"], errors.EXIT_USAGE),
    "missing argument": (["compile"], errors.EXIT_USAGE),
    "resolution 0x0": (["compile", "s2dit-tiny", "--target", "onnx", "--resolution", "0x0"], errors.EXIT_USAGE),
    "resolution not HxW": (["compile", "s2dit-tiny", "--target", "onnx", "--resolution", "64"], errors.EXIT_USAGE),
    "empty stages": (["compile", "s2dit-tiny", "--target", "onnx", "--stages", ","], errors.EXIT_USAGE),
    "unknown stage": (["compile", "s2dit-tiny", "--target", "onnx", "--stages", "dit"], errors.EXIT_USAGE),
    "bad soc": (["compile", "s2dit-tiny", "--target", "executorch-qnn", "--soc", "SM0000"], errors.EXIT_USAGE),
    "soc on coreml": (["compile", "s2dit-tiny", "--target", "coreml", "--soc", "SM8650"], errors.EXIT_USAGE),
    "bad option": (["compile", "s2dit-tiny", "--target", "onnx", "--option", "novalue"], errors.EXIT_USAGE),
    "height 0": (["generate", "x", "--model", "s2dit-tiny", "--height", "0"], errors.EXIT_USAGE),
    "width not multiple of 8": (["generate", "x", "--model", "s2dit-tiny", "--width", "60"], errors.EXIT_USAGE),
    "chunks 0": (["generate", "x", "--chunks", "0"], errors.EXIT_USAGE),
    "seed out of range": (["generate", "x", "--seed", str(2**64)], errors.EXIT_USAGE),
    "negative seed": (["validate", "b", "--seed", "-1"], errors.EXIT_USAGE),
    "repeats 0": (["bench", "b", "--repeats", "0"], errors.EXIT_USAGE),
    "negative warmup": (["bench", "b", "--warmup", "-1"], errors.EXIT_USAGE),
    "bad floor": (["validate", "b", "--floor", "dit_step.velocity"], errors.EXIT_USAGE),
    "bad video extension": (["generate", "x", "-o", "v.avi"], errors.EXIT_USAGE),
    "missing output folder": (["generate", "x", "-o", "/nonexistent-dir/v.mp4"], errors.EXIT_USAGE),
    "missing bundle (validate)": (["validate", "/nonexistent-bundle"], errors.EXIT_INPUT),
    "missing bundle (bench)": (["bench", "/nonexistent-bundle"], errors.EXIT_INPUT),
    "missing bundle (generate)": (["generate", "x", "--bundle", "/nonexistent-bundle", "-o", "{tmp}/v.mp4"],
                                  errors.EXIT_INPUT),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_every_error_is_strict_json_with_its_exit_code(case, capsys, tmp_path, no_model_load):
    argv, code = ERROR_CASES[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = main([*argv, "--json"])
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        rc = exc.code
    out = capsys.readouterr().out
    doc = strict(out)
    assert rc == code, (rc, doc)
    assert doc["error"] in ("usage", "input", "output_exists") and doc["message"]


def test_argparse_error_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compile", "--target", "onnx", "--resolution", "7x13", "--json"])
    assert exc.value.code == errors.EXIT_USAGE
    msg = strict(capsys.readouterr().out)["message"]
    assert "--resolution" in msg and "7x13" in msg and "13x7" not in msg


def test_bad_soc_fails_before_any_model_load(capsys, no_model_load):
    rc = main(["compile", "s2dit-small", "--target", "onnx-qnn", "--soc", "SM0000", "--json"])
    doc = strict(capsys.readouterr().out)
    assert rc == errors.EXIT_USAGE and "SM8650" in doc["message"] and "--soc" in doc["message"]


def test_internal_error_is_json_and_exit_1(monkeypatch, capsys):
    from s2dit_deploy.commands import models

    monkeypatch.setattr(models, "run", lambda args: 1 / 0)
    assert main(["models", "--json"]) == errors.EXIT_INTERNAL
    captured = capsys.readouterr()
    doc = strict(captured.out)
    assert doc["error"] == "internal" and doc["type"] == "ZeroDivisionError"
    assert "Traceback" in captured.err


def test_non_finite_results_become_null(monkeypatch, capsys):
    from s2dit_deploy.commands import models

    monkeypatch.setattr(models, "run", lambda args: ({"psnr_db": float("inf"), "x": [np.float32("nan")]}, ""))
    assert main(["models", "--json"]) == 0
    assert strict(capsys.readouterr().out) == {"psnr_db": None, "x": [None]}


def test_success_is_strict_json(capsys):
    assert main(["models", "--no-flops", "--json"]) == 0
    doc = strict(capsys.readouterr().out)
    tiny = next(m for m in doc if m["name"] == "s2dit-tiny")
    assert tiny["resolution"] == f"{tiny['height']}x{tiny['width']}"  # HxW, as --resolution takes it


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in ("2  usage", "3  input", "4  fidelity", "1  internal"):
        assert code in out


def test_help_options_lists_the_targets_options(capsys):
    assert main(["compile", "--target", "onnx", "--help-options", "--json"]) == 0
    names = {o["name"] for o in strict(capsys.readouterr().out)}
    assert "precision" in names


def test_startup_imports_no_toolchain():
    code = ("import sys; from s2dit_deploy.cli import main; import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['models', '--no-flops'])\n"
            "print([m for m in ('transformers', 'coremltools', 'executorch', 'onnxruntime') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stderr


def test_generate_streams_chunks_to_the_writer(monkeypatch, tmp_path, capsys):
    """Each chunk reaches the encoder before the next one is generated."""
    import s2dit_deploy.video_io as video_io
    from s2dit_deploy.model_zoo.pipeline import Pipeline

    events = []
    real_stream, real_write = Pipeline.stream, video_io.VideoWriter.write

    def stream(self, *a, **k):
        for frames in real_stream(self, *a, **k):
            events.append("chunk")
            yield frames

    def write(self, frames):
        events.append("write")
        real_write(self, frames)

    monkeypatch.setattr(Pipeline, "stream", stream)
    monkeypatch.setattr(video_io.VideoWriter, "write", write)
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", "--model", "s2dit-tiny", "--chunks", "3", "--steps", "1", "-o", str(out)]) == 0
    assert events == ["chunk", "write"] * 3
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_generate_refuses_an_existing_video_without_force(tmp_path, capsys, no_model_load):
    out = tmp_path / "mine.mp4"
    out.write_bytes(b"precious")
    rc = main(["generate", "x", "--model", "s2dit-tiny", "-o", str(out), "--json"])
    assert rc == errors.EXIT_INPUT and "--force" in strict(capsys.readouterr().out)["message"]
    assert out.read_bytes() == b"precious"


def test_failed_generate_leaves_no_half_file(monkeypatch, tmp_path, capsys):
    from s2dit_deploy.model_zoo.pipeline import Pipeline

    real_stream = Pipeline.stream

    def failing(self, *a, **k):
        it = real_stream(self, *a, **k)
        yield next(it)
        raise RuntimeError("decoder crashed")

    monkeypatch.setattr(Pipeline, "stream", failing)
    out = tmp_path / "v.gif"
    assert main(["generate", "x", "--model", "s2dit-tiny", "--chunks", "2", "--steps", "1", "-o", str(out),
                 "--json"]) == errors.EXIT_INTERNAL
    strict(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []


def test_bench_out_checked_before_the_work(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc = main(["bench", "/nonexistent-bundle", "--out", str(tmp_path / "f"), "--json"])
    assert rc == errors.EXIT_USAGE and "--out" in strict(capsys.readouterr().out)["message"]
