"""The `s2dit-deploy` CLI: --help and --json on every command, clear errors, real video files."""

import json
import subprocess
import sys

import imageio.v3 as iio
import pytest

from s2dit_deploy.cli import build_parser, main
from s2dit_deploy.commands import COMMANDS


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "s2dit_deploy.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", [c.NAME for c in COMMANDS])
def test_every_command_has_help_and_json(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    assert "--json" in sub.format_help()
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0


def test_models_json(capsys):
    assert main(["models", "--json", "--no-flops"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in out] == ["s2dit-tiny", "s2dit-small", "s2dit-mobile"]


def test_json_stdout_is_only_the_result(monkeypatch, capfd):
    """Libraries that print (ExecuTorch's quantizer) or write to fd 1 (native QNN logs) must not
    corrupt --json output: while a command runs, stdout goes to stderr."""
    import os

    from s2dit_deploy.commands import models

    def noisy(args):
        print("No quant config is implemented for op, aten.dropout.default")
        os.write(1, b"[INFO] [Qnn ExecuTorch]: native log line\n")
        return {"ok": True}, "ok"

    monkeypatch.setattr(models, "run", noisy)
    assert main(["models", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ok": True}
    assert "No quant config" in err and "native log line" in err


def test_generate_writes_a_playable_video(tmp_path, capsys):
    out = tmp_path / "v.gif"
    code = main(["generate", "a red ball", "--model", "s2dit-tiny", "--chunks", "2", "--steps", "1",
                 "--out", str(out), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["frames"] == 24 and res["output"] == str(out)
    assert iio.imread(out).shape == (24, 64, 128, 3)


def test_generate_mp4(tmp_path):
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", "--model", "s2dit-tiny", "--chunks", "1", "--steps", "1", "-o", str(out)]) == 0
    assert iio.imread(out, plugin="pyav").shape[0] == 12


def test_unknown_model_exits_2_with_message(tmp_path):
    res = run_cli("generate", "x", "--model", "nope", "--json", "-o", str(tmp_path / "a.mp4"))
    assert res.returncode == 2
    assert "unknown model 'nope'" in json.loads(res.stdout)["message"]
    assert not (tmp_path / "a.mp4").exists()


def test_bad_output_format_loses_nothing(tmp_path):
    res = run_cli("generate", "x", "--model", "s2dit-tiny", "--chunks", "1", "--steps", "1", "-o", str(tmp_path / "a.avi"))
    assert res.returncode == 2 and "unsupported video format" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_top_level_folder_names_leak_into_site_packages(tmp_path):
    # run outside the checkout: only what the install put on sys.path is importable there
    code = (
        "import importlib.util as u; "
        "print([n for n in ('model_zoo','quant','targets','bench','reference_training') if u.find_spec(n)]); "
        "print(u.find_spec('s2dit_deploy.quant') is not None)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.stdout.split() == ["[]", "True"], res.stderr
