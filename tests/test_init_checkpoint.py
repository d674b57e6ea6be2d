"""`s2dit-deploy init`: a seeded checkpoint folder laid out like a trained one, deterministic per seed,
initialised the way each module's own constructor does, written tensor by tensor."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from s2dit_deploy.cli import main
from s2dit_deploy.model_zoo.checkpoint import STAGE_FILES, is_checkpoint_dir, read_config
from s2dit_deploy.model_zoo.init_weights import S2DIT_ATOMIC, UNIT_BYTES, init_checkpoint, plan_units
from s2dit_deploy.model_zoo.registry import build_stage, get_card, load_stage, resolve

TINY = get_card("s2dit-tiny").config
STAGES = ("dit", "text_encoder", "decoder")


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init") / "tiny32"
    return folder, init_checkpoint(TINY, folder, seed=1, dtype="fp32")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_matches_a_trained_checkpoint(tiny32):
    folder, result = tiny32
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", *STAGE_FILES.values()])
    assert read_config(folder) == TINY and is_checkpoint_dir(folder)
    assert not list(folder.parent.glob(".tiny32.*"))  # atomic: no partial folder left
    for entry in result["files"]:  # the reported sizes and hashes are the files'
        path = folder / entry["name"]
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == _sha(path)
    for stage in STAGES:  # safetensors' own reader accepts the streamed file, with save_checkpoint's metadata
        with safe_open(str(folder / STAGE_FILES[stage]), "pt") as fh:
            assert fh.metadata() == {"stage": stage, "model": TINY.name}
        with torch.device("meta"):
            meta = build_stage(TINY, stage).state_dict()
        state = load_file(str(folder / STAGE_FILES[stage]))
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in meta.items()}
    assert result["params"] == sum(v.numel() for s in STAGES for v in load_file(str(folder / STAGE_FILES[s])).values())


def _tolerance(n: int) -> float:
    return 0.05 + 5 / n**0.5  # sample std of n draws


def _real(stage: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_stage(TINY, stage).state_dict()


def _deterministic(stage: str) -> set[str]:
    """Tensors the module's constructor sets without randomness (equal across two seeds)."""
    a, b = _real(stage, 7), _real(stage, 8)
    return {k for k in a if torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def tiny32_split(tmp_path_factory):
    """Units of one byte: every module is split as far as it may be (parent rules stay whole)."""
    folder = tmp_path_factory.mktemp("init") / "split"
    return folder, init_checkpoint(TINY, folder, seed=1, dtype="fp32", unit_bytes=1)


@pytest.mark.parametrize("which", ["tiny32", "tiny32_split"])
def test_init_reproduces_each_modules_own_init(which, request):
    """Parameter by parameter against a real (seeded) build: deterministic inits (norms, zero
    biases, the samplers' pooling / nearest weights) equal, random ones drawn from the same
    distribution (std, mean and the share beyond 2 std, which tells uniform from normal, within
    sampling error), whether the stage is materialised whole or module by module."""
    folder, _ = request.getfixturevalue(which)
    for stage in STAGES:
        mine = load_stage(TINY, folder, stage).state_dict()
        real, fixed = _real(stage, 7), _deterministic(stage)
        assert fixed and len(fixed) < len(real)
        for k, ref in real.items():
            got = mine[k]
            assert got.dtype == ref.dtype == torch.float32, k
            if k in fixed:
                assert torch.equal(got, ref), f"{stage}.{k}: deterministic init differs"
                continue
            ratio = float(got.std() / ref.std())
            assert abs(ratio - 1) < _tolerance(ref.numel()), f"{stage}.{k}: std ratio {ratio:.3f}"
            assert abs(float(got.mean() - ref.mean())) < 6 * float(ref.std()) / ref.numel() ** 0.5 + 1e-6, k
            tail = [float(((t - t.mean()).abs() > 2 * t.std()).float().mean()) for t in (got, ref)]
            assert abs(tail[0] - tail[1]) < 0.02 + 4 * (0.05 / ref.numel()) ** 0.5, \
                f"{stage}.{k}: {tail[0]:.3f} vs {tail[1]:.3f} beyond 2 std (uniform 0, normal 0.046)"


def test_same_seed_same_tensors_other_seed_other_tensors(tmp_path, tiny32):
    folder, result = tiny32
    again = init_checkpoint(TINY, tmp_path / "again", seed=1, dtype="fp32")
    assert [f["sha256"] for f in again["files"]] == [f["sha256"] for f in result["files"]]
    other = tmp_path / "other"
    init_checkpoint(TINY, other, seed=2, dtype="fp32")
    for stage in STAGES:
        a = load_file(str(folder / STAGE_FILES[stage]))
        b = load_file(str(other / STAGE_FILES[stage]))
        same = {k for k in a if torch.equal(a[k], b[k])}
        assert same == _deterministic(stage), stage  # every random tensor moved with the seed


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_init_loads_in_its_dtype_and_runs_finite(tmp_path, tiny32, dtype, torch_dtype):
    folder = tmp_path / dtype
    init_checkpoint(TINY, folder, seed=1, dtype=dtype)
    ref32 = load_file(str(tiny32[0] / "dit.safetensors"))
    mine = load_file(str(folder / "dit.safetensors"))
    assert all(v.dtype == torch_dtype and torch.equal(v, ref32[k].to(torch_dtype)) for k, v in mine.items())
    config, path = resolve(str(folder))  # a folder is a checkpoint, as `compile DIR` takes it
    assert config == TINY and path == folder
    dit = load_stage(config, folder, "dit")
    assert {p.dtype for p in dit.parameters()} == {torch_dtype}
    # stored in half precision, computed in fp32 on the host one layer at a time (compute_dtype.py)
    x = torch.randn(1, *TINY.chunk_latent_shape)
    ctx = torch.randn(1, 77, TINY.dit.text_dim)
    with torch.no_grad():
        v = dit(x, 0.5, ctx)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert {p.dtype for p in dit.parameters()} == {torch_dtype}  # widening left nothing behind


def test_paper_scale_units_are_small(tmp_path):
    """What bounds init's memory: s2dit-mobile's 1.83B-parameter DiT splits into units (one block
    or less) of at most UNIT_BYTES of fp32 each; only a leaf layer could exceed it, and none does."""
    config = get_card("s2dit-mobile").config
    with torch.device("meta"):
        dit = build_stage(config, "dit")
    units = plan_units(dit)
    sizes = [sum(p.numel() * 4 for p in (u.module.parameters(recurse=not u.direct_only))) for u in units]
    assert max(sizes) <= UNIT_BYTES < sum(sizes) / 10
    assert sum(sizes) == 4 * sum(p.numel() for p in dit.parameters())
    with torch.device("meta"):
        tiny = build_stage(TINY, "dit")
    split = plan_units(tiny, limit=1, atomic=S2DIT_ATOMIC)  # what the tiny32_split fixture wrote
    assert any(u.direct_only for u in split) and len(split) > 50
    assert {type(u.module).__name__ for u in split if not u.direct_only} >= {"Downsampler", "Upsampler", "Linear"}


def _cli(capsys, *argv) -> tuple[int, dict]:
    try:
        code = main(["init", *map(str, argv), "--json"])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    return code, json.loads(capsys.readouterr().out)


def test_cli_json_and_bad_input(tmp_path, capsys):
    out = tmp_path / "ck"
    code, doc = _cli(capsys, "s2dit-tiny", "-o", out, "--seed", 3, "--dtype", "bf16")
    assert code == 0 and set(doc) == {"model", "path", "dtype", "seed", "files", "params", "seconds"}
    assert (doc["model"], doc["dtype"], doc["seed"]) == ("s2dit-tiny", "bf16", 3)
    assert [f["name"] for f in doc["files"]] == ["config.json", *STAGE_FILES.values()]
    before = _sha(out / "dit.safetensors")
    code, doc = _cli(capsys, "s2dit-tiny", "-o", out, "--seed", 4)  # a checkpoint folder is replaced
    assert code == 0 and _sha(out / "dit.safetensors") != before

    code, doc = _cli(capsys, "s2dit-huge", "-o", tmp_path / "x")
    assert code == 2 and "MODEL" in doc["message"] and "s2dit-mobile" in doc["message"]
    code, doc = _cli(capsys, "s2dit-tiny", "-o", tmp_path / "x", "--dtype", "fp8")
    assert code == 2 and "--dtype" in doc["message"]
    code, doc = _cli(capsys, "s2dit-tiny", "-o", tmp_path / "x", "--seed", -1)
    assert code == 2 and "--seed" in doc["message"]
    assert not (tmp_path / "x").exists()

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    code, doc = _cli(capsys, "s2dit-tiny", "-o", user)
    assert code == 3 and doc["error"] == "output_exists" and "--force" in doc["message"]
    assert (user / "notes.txt").read_text() == "mine"
    code, _ = _cli(capsys, "s2dit-tiny", "-o", user, "--force")
    assert code == 0 and is_checkpoint_dir(user) and not (user / "notes.txt").exists()
