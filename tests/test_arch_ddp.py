"""Search and pruning under torchrun: 2 CPU processes (gloo, DDP) follow the 1-process run step by
step, and only rank 0 writes files and stdout."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from s2dit_deploy.model_zoo.checkpoint import save_checkpoint
from s2dit_deploy.model_zoo.registry import get_card, load_stage

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not available")


@pytest.fixture(scope="module")
def teacher_and_sets(tmp_path_factory):
    """A dense (FFFFFF) s2dit-tiny checkpoint and a config naming shared latent sets, so the runs
    compared learn from the same data (sampled once, by the first run)."""
    root = tmp_path_factory.mktemp("ddp")
    card = get_card("s2dit-tiny").config
    cfg = dataclasses.replace(card, dit=dataclasses.replace(card.dit, layout="FFFFFF"), height=32, width=64)
    save_checkpoint(root / "teacher", cfg, {s: load_stage(cfg, None, s) for s in ("text_encoder", "dit", "decoder")})
    shared = {"count": 8, "heldout_count": 4, "batch_size": 4, "checkpoint_every": 100, "log_every": 1,
              "latents": str(root / "latents"), "heldout": str(root / "heldout")}
    (root / "search.json").write_text(json.dumps({**shared, "eval_batches": 1, "max_eval_layouts": 2}))
    (root / "prune.json").write_text(json.dumps(shared))
    (root / "flow.json").write_text(json.dumps({**shared, "dit": {"layout": "LLSSLL"}, "warmup": 1}))
    return root


def run(argv: list[str], nproc: int) -> dict:
    if nproc == 1:
        cmd = [sys.executable, "-m", "s2dit_deploy", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "s2dit_deploy", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # one JSON document: rank 0's, and nothing from rank 1


def assert_same_curve(one: list, two: list) -> None:
    assert len(one) == len(two) and len(one) > 1
    for a, b in zip(one, two):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (one, two)


def test_search_two_processes_match_one(teacher_and_sets):
    root = teacher_and_sets
    conf = root / "search.json"
    common = ["search", "--teacher", str(root / "teacher"), "--flops", "--k", "2", "--resolution", "32x64",
              "--steps", "3", "--config", str(conf), "--threads", "1", "--json"]
    one = run([*common, "--out", str(root / "s1")], 1)
    two = run([*common, "--out", str(root / "s2")], 2)
    assert (one["world"], two["world"]) == (1, 2)
    assert_same_curve(one["losses"], two["losses"])
    assert two["router_scores"] == pytest.approx(one["router_scores"], abs=1e-4)
    assert two["layout"] == one["layout"]
    assert (root / "s2" / "model" / "config.json").is_file()


def test_prune_two_processes_match_one(teacher_and_sets):
    root = teacher_and_sets
    conf = root / "prune.json"
    common = ["prune", "--teacher", str(root / "teacher"), "--keep-blocks", "8", "--keep-heads", "1",
              "--keep-ffn", "32", "--mask-steps", "2", "--finetune-steps", "2", "--config", str(conf),
              "--threads", "1", "--json"]
    one = run([*common, "--out", str(root / "p1")], 1)
    two = run([*common, "--out", str(root / "p2")], 2)
    assert (one["world"], two["world"]) == (1, 2)
    for phase in ("masks", "dense"):
        assert_same_curve(one["losses"][phase], two["losses"][phase])
    assert two["kept"] == one["kept"]


def test_latent_flow_two_processes_match_one(teacher_and_sets):
    """The recipe of the search teacher and the supernets: velocity KD into another layout, with the
    teacher's weights inherited; the 2-process run follows the 1-process one."""
    root = teacher_and_sets
    teacher = str(root / "teacher")
    common = ["train", "latent-flow", "--model", teacher, "--init", teacher, "--kd-from", teacher, "--steps", "3",
              "--config", str(root / "flow.json"), "--threads", "1", "--json"]
    one = run([*common, "--out", str(root / "f1")], 1)
    two = run([*common, "--out", str(root / "f2")], 2)
    assert (one["world"], two["world"]) == (1, 2)
    assert_same_curve(one["losses"], two["losses"])
    assert one["layout"] == "LLSSLL" and one["inherited"]["copied"] > 0.8 * one["inherited"]["total"]
    assert one["eval_loss"] == pytest.approx(two["eval_loss"], rel=1e-3)


def test_a_batch_that_does_not_split_is_refused(teacher_and_sets, monkeypatch, capsys):
    """Checked right after the process group forms, before any file is written (a 2-process world
    is simulated here; starting torchrun only to see it refuse would cost seconds for nothing)."""
    import torch

    import s2dit_deploy.reference_training.search.train as search_train
    from s2dit_deploy.cli import main

    root = teacher_and_sets
    monkeypatch.setattr(search_train, "init_distributed", lambda: (0, 2, torch.device("cpu")))
    code = main(["search", "--teacher", str(root / "teacher"), "--flops", "--resolution", "32x64", "--steps", "1",
                 "--batch-size", "3", "--config", str(root / "search.json"), "--out", str(root / "odd"), "--json"])
    err = json.loads(capsys.readouterr().out)
    assert code == 3 and err["error"] == "input"
    assert "batch_size=3" in err["message"] and "WORLD_SIZE=2" in err["message"]
    assert not (root / "odd").exists()
