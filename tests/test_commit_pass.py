"""The ``commit`` option (issue 11, item 5): ``clean`` (a t = 0 pass on the clean chunk, steps + 1 DiT
calls per chunk) or ``last-step`` (the last denoising step's entries, steps calls), through
Pipeline, the CLI, bundles, host_loop.json and the standalone reference host."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import s2dit_deploy as sd
from s2dit_deploy import errors
from s2dit_deploy.app_bundle import host_loop
from s2dit_deploy.cli import main as cli_main
from s2dit_deploy.metrics import psnr
from s2dit_deploy.model_zoo.pipeline import COMMIT_MODES, Pipeline, dit_calls_per_chunk
from s2dit_deploy.model_zoo.sampler import FewStepSchedule
from tests.test_app_bundle import run_standalone

PROMPT = "a red ball bouncing"


@pytest.fixture(scope="module")
def pipe():
    return sd.load_pipeline("s2dit-tiny")


class CountingDiT:
    def __init__(self, dit):
        self.dit, self.calls = dit, []
        self.init_cache, self.push_cache = dit.init_cache, dit.push_cache

    def step(self, x, t, *args, **kwargs):
        self.calls.append(float(t))
        return self.dit.step(x, t, *args, **kwargs)


def counted(pipe):
    dit = CountingDiT(pipe.dit)
    return Pipeline(pipe.config, pipe.text_encoder, dit, pipe.decoder), dit


# ----------------------------------------------------------------------------- validation

def test_a_bad_commit_is_refused_before_any_work(pipe):
    class NoWork:
        def __getattr__(self, name):
            raise AssertionError("work started before the commit option was checked")

        def __call__(self, *a, **k):
            raise AssertionError("work started before the commit option was checked")

    lazy = Pipeline(pipe.config, NoWork(), NoWork(), NoWork())
    with pytest.raises(ValueError, match="commit must be one of 'clean', 'last-step', got 'last'"):
        lazy.stream(PROMPT, 2, commit="last")  # raised by the call itself, not at the first chunk
    with pytest.raises(ValueError, match="commit"):
        lazy.generate(PROMPT, 1, commit="Clean")
    state = pipe.start()
    with pytest.raises(ValueError, match="commit"):
        lazy.denoise_chunk(None, None, state, FewStepSchedule(1), commit="none")
    with pytest.raises(ValueError, match="commit"):
        dit_calls_per_chunk(4, "both")
    assert [dit_calls_per_chunk(s, m) for s in (1, 4) for m in COMMIT_MODES] == [2, 1, 5, 4]


def test_cli_commit_is_a_usage_error_naming_the_flag(capsys, monkeypatch):
    import s2dit_deploy.model_zoo.pipeline as pipeline
    from s2dit_deploy.commands import generate

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit) as exc:
        cli_main(["generate", "x", "--model", "s2dit-tiny", "--commit", "last", "--json"])
    assert exc.value.code == errors.EXIT_USAGE
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"] == "usage" and "--commit" in doc["message"] and "last-step" in doc["message"]
    assert generate.COMMIT_MODES == COMMIT_MODES  # the CLI's torch-free copy agrees with model_zoo


# ----------------------------------------------------------------------------- float pipeline

@pytest.mark.parametrize("steps", [1, 2])
def test_dit_calls_per_chunk(pipe, steps):
    for commit, per_chunk in (("clean", steps + 1), ("last-step", steps)):
        p, dit = counted(pipe)
        chunks = list(p.stream(PROMPT, 2, steps, seed=0, commit=commit))
        assert len(chunks) == 2 and len(dit.calls) == 2 * per_chunk, (commit, dit.calls)
        assert (0.0 in dit.calls) == (commit == "clean")  # the t = 0 pass only with clean
        assert per_chunk == dit_calls_per_chunk(steps, commit)


def test_commit_changes_only_the_chunks_after_the_first(pipe):
    clean = pipe.generate(PROMPT, 2, 2, seed=1)
    last = pipe.generate(PROMPT, 2, 2, seed=1, commit="last-step")
    assert np.array_equal(clean, pipe.generate(PROMPT, 2, 2, seed=1, commit="clean"))  # clean is the default
    assert np.array_equal(clean[:12], last[:12])
    assert not np.array_equal(clean[12:], last[12:])


def test_last_step_commits_the_last_steps_entries(pipe):
    """The window after a last-step chunk holds exactly the entries of that chunk's last dit.step call."""
    ctx, x = pipe.encode_prompt(PROMPT), torch.randn((1, *pipe.config.chunk_latent_shape))
    p, dit = counted(pipe)
    seen = []
    real = dit.step
    dit.step = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
    state = p.start()
    p.denoise_chunk(x, ctx, state, FewStepSchedule(2), renoise=lambda j, s: torch.zeros(s), commit="last-step")
    want = pipe.dit.push_cache(pipe.start().dit_cache, seen[-1][1])
    assert len(seen) == 2 and all(torch.equal(state.dit_cache[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- bundles and app hosts

def test_bundle_last_step_matches_float_last_step(tiny_xnnpack_bundle, pipe, tmp_path):
    out = tmp_path / "last.npy"
    assert cli_main(["generate", PROMPT, "--bundle", str(tiny_xnnpack_bundle), "--chunks", "2", "--steps", "2",
                     "--commit", "last-step", "-o", str(out), "--json"]) == 0
    got = np.load(out)
    ref = pipe.generate(PROMPT, 2, 2, seed=0, commit="last-step")
    clean = pipe.generate(PROMPT, 2, 2, seed=0)
    assert got.shape == ref.shape and psnr(ref.astype(np.float32), got.astype(np.float32)) >= 40.0
    # the bundle really followed last-step: its chunk 1 is nearer float last-step than float clean
    assert np.abs(got[12:].astype(float) - ref[12:]).mean() < np.abs(got[12:].astype(float) - clean[12:]).mean()


def test_host_loop_describes_both_commit_modes(tiny_xnnpack_bundle):
    spec = host_loop.load_host_loop(tiny_xnnpack_bundle)
    commit = spec["commit"]
    assert commit["default"] == "clean" and set(commit["modes"]) == set(COMMIT_MODES)
    for mode, m in commit["modes"].items():
        assert m["dit_step_calls_per_chunk"] == {k: dit_calls_per_chunk(len(v), mode)
                                                 for k, v in spec["schedule"]["rows"].items()}
        assert m["extra_call"] == (mode == "clean")
    skipped = [op for op in spec["loop"]["per_chunk"] if "commit_modes" in op]
    assert skipped == [next(op for op in spec["loop"]["per_chunk"] if op.get("t_row") == "commit")]
    assert skipped[0]["commit_modes"] == ["clean"]
    assert "last denoising" in (tiny_xnnpack_bundle / "INTEGRATION.md").read_text()


def test_standalone_host_last_step_gives_the_frames_of_generate(tiny_xnnpack_bundle, tmp_path):
    ours, ref = tmp_path / "generate.npy", tmp_path / "ref.npy"
    assert cli_main(["generate", PROMPT, "--bundle", str(tiny_xnnpack_bundle), "--chunks", "2", "--seed", "3",
                     "--commit", "last-step", "-o", str(ours), "--json"]) == 0
    res = run_standalone(tiny_xnnpack_bundle, PROMPT, "--chunks", "2", "--seed", "3", "--commit", "last-step",
                         "-o", str(ref))
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = np.load(ours).astype(np.int16), np.load(ref).astype(np.int16)
    assert a.shape == b.shape == (24, 64, 128, 3) and np.abs(a - b).max() <= 1
    clean = tmp_path / "clean.npy"
    assert run_standalone(tiny_xnnpack_bundle, PROMPT, "--chunks", "2", "--seed", "3", "-o", str(clean)).returncode == 0
    c = np.load(clean).astype(np.int16)
    assert np.array_equal(c[:12], b[:12]) and np.abs(c[12:] - b[12:]).max() > 1  # the host did switch mode


def test_a_spec_without_commit_is_read_as_clean_only(tiny_xnnpack_bundle, tmp_path):
    """Bundles written before the commit section: valid, clean only; last-step is refused by name."""
    b = tmp_path / "old"
    shutil.copytree(tiny_xnnpack_bundle, b)
    path = b / host_loop.HOST_LOOP_FILE
    spec = json.loads(path.read_text())
    del spec["commit"]
    for op in spec["loop"]["per_chunk"]:
        op.pop("commit_modes", None)
    path.write_text(json.dumps(spec))
    host_loop.validate_host_loop(spec, "old spec")
    res = run_standalone(b, PROMPT, "--chunks", "1", "--commit", "last-step", "-o", str(tmp_path / "f.npy"))
    assert res.returncode == 2 and "--commit last-step" in res.stderr and "clean only" in res.stderr
    bad = dict(spec, commit={"default": "last-step", "modes": {"clean": {"committed_call": "commit pass",
               "extra_call": True, "doc": "", "dit_step_calls_per_chunk": {"4": 5}}}})
    with pytest.raises(host_loop.HostLoopError, match="commit.default"):
        host_loop.validate_host_loop(bad, "bad spec")


# ----------------------------------------------------------------------------- fidelity measurement

def test_commit_fidelity_reports_finite_numbers():
    from s2dit_deploy.bench.commit_pass import commit_fidelity

    r = commit_fidelity("s2dit-tiny", prompts=("a red ball",), chunks=2, steps=2)
    assert {"psnr_db", "psnr_db_per_chunk", "boundary_jump", "dit_calls_per_chunk", "first_chunk_max_abs_diff",
            "per_prompt"} <= set(r)
    assert r["dit_calls_per_chunk"] == {"clean": 3, "last-step": 2}
    assert r["first_chunk_max_abs_diff"] == 0 and list(r["psnr_db_per_chunk"]) == ["1"]
    numbers = [r["psnr_db"], *r["psnr_db_per_chunk"].values(), *r["boundary_jump"].values()]
    assert all(isinstance(v, float) and math.isfinite(v) for v in numbers), r
    assert set(r["boundary_jump"]) == set(COMMIT_MODES) and r["psnr_db"] > 0
    with pytest.raises(ValueError, match="chunks"):
        commit_fidelity("s2dit-tiny", chunks=1)
