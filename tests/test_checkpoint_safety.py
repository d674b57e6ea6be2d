"""Checkpoint saves survive a kill at any step; weights are checked after the cast, by dtype."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import s2dit_deploy as sd
from s2dit_deploy.errors import InputError
from s2dit_deploy.model_zoo.checkpoint import (
    CheckpointError, atomic_folder, checkpoint_digest, recover_folder, save_checkpoint,
)
from s2dit_deploy.model_zoo.registry import get_card, load_stage

# The child saves a second version over a first one and dies (os._exit) at the Nth call of
# os.replace / shutil.rmtree made by the save; the parent then loads the folder.
KILLED_SAVE = textwrap.dedent("""
    import os, shutil, sys
    from s2dit_deploy.model_zoo.checkpoint import save_checkpoint
    from s2dit_deploy.model_zoo.registry import get_card, load_stage
    folder, kill_at = sys.argv[1], int(sys.argv[2])
    cfg = get_card("s2dit-tiny").config
    modules = {"decoder": load_stage(cfg, None, "decoder", seed=2)}
    calls = [0]
    def dying(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(9)
            return real(*args, **kwargs)
        return wrapper
    os.replace, shutil.rmtree = dying(os.replace), dying(shutil.rmtree)
    save_checkpoint(folder, cfg, modules)
    print("calls", calls[0])
""")


def _save_v1(folder):
    cfg = get_card("s2dit-tiny").config
    return save_checkpoint(folder, cfg, {"decoder": load_stage(cfg, None, "decoder", seed=1)})


def _weights_id(folder):
    """Identity of the saved values (safetensors' metadata order varies between saves, so not bytes)."""
    module = load_stage(sd.model_zoo.checkpoint.read_config(folder), folder, "decoder")  # loadable
    return hashlib.sha256(b"".join(v.numpy().tobytes() for v in module.state_dict().values())).hexdigest()


def test_save_survives_a_kill_at_every_step(tmp_path):
    folder = tmp_path / "ckpt"
    _save_v1(folder)
    old = _weights_id(folder)
    full = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), "0"], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]
    new = _weights_id(folder)
    steps = int(full.stdout.split()[-1])
    assert old != new and steps >= 2  # at least: move old aside, rename new in (and delete old)
    seen = set()
    for kill_at in range(1, steps + 1):
        _save_v1(folder)
        run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), str(kill_at)], capture_output=True)
        assert run.returncode == 9, run.stderr[-2000:]
        digest = _weights_id(folder)  # loadable: recovers a moved-aside copy if needed
        assert digest in (old, new), kill_at
        seen.add(digest)
        _save_v1(folder)  # a later save over the interrupted one also works
        assert _weights_id(folder) == old
        assert not list(tmp_path.glob(".ckpt.old"))
    assert seen == {old, new}


def test_recover_restores_a_moved_aside_copy(tmp_path):
    folder = _save_v1(tmp_path / "ckpt")
    digest = checkpoint_digest(folder)
    folder.rename(tmp_path / ".ckpt.old")  # as if killed between the two renames
    assert sd.model_zoo.checkpoint.read_config(folder).name == "s2dit-tiny"
    assert checkpoint_digest(folder) == digest and not (tmp_path / ".ckpt.old").exists()


def test_atomic_folder_failure_keeps_the_old_folder(tmp_path):
    folder = _save_v1(tmp_path / "ckpt")
    digest = checkpoint_digest(folder)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(folder) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert checkpoint_digest(recover_folder(folder)) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_digest_covers_config_and_weights_not_the_path(tmp_path):
    a = _save_v1(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert checkpoint_digest(a) == checkpoint_digest(b)
    (b / "extra.txt").write_text("not part of the identity")
    assert checkpoint_digest(a) == checkpoint_digest(b)
    cfg = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(cfg, indent=1))
    assert checkpoint_digest(a) != checkpoint_digest(b)


@pytest.fixture
def tiny_decoder(tmp_path):
    folder = _save_v1(tmp_path / "ckpt")
    state = load_file(str(folder / "decoder.safetensors"))
    return folder, state, next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


def _rewrite(folder, state, key, value):
    state[key] = value
    save_file(state, str(folder / "decoder.safetensors"))


def test_f64_that_overflows_fp32_is_rejected(tiny_decoder):
    folder, state, key = tiny_decoder
    big = state[key].double()
    big.view(-1)[0] = 1e300  # finite in f64, inf in fp32
    _rewrite(folder, state, key, big)
    with pytest.raises(CheckpointError, match=f"NaN/inf values in '{key}'"):
        load_stage(sd.model_zoo.checkpoint.read_config(folder), folder, "decoder")


def test_f64_in_range_still_loads(tiny_decoder):
    folder, state, key = tiny_decoder
    _rewrite(folder, state, key, state[key].double())
    module = load_stage(sd.model_zoo.checkpoint.read_config(folder), folder, "decoder")
    assert module.state_dict()[key].dtype == torch.float32


@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.bool, "BOOL"),
                                         (torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_non_float_and_float8_weights_are_rejected(tiny_decoder, dtype, name):
    folder, state, key = tiny_decoder
    _rewrite(folder, state, key, state[key].to(dtype))
    with pytest.raises(CheckpointError) as info:
        load_stage(sd.model_zoo.checkpoint.read_config(folder), folder, "decoder")
    assert key in str(info.value) and name in str(info.value) and isinstance(info.value, InputError)


def test_card_resolution_is_the_checkpoints():
    small = {m["name"]: m for m in sd.list_models()}["s2dit-small"]
    pipe = sd.load_pipeline("s2dit-small")
    assert small["resolution"] == f"{pipe.config.height}x{pipe.config.width}"
    assert small["deploy_resolution"] == "192x320"
    card = get_card("s2dit-small")
    assert card.config == pipe.config and card.deploy_resolution == (192, 320)
