"""The training entry under torchrun: 2 CPU processes (gloo) follow the 1-process loss curve."""

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not available")


def run_pretrain(tmp_path, nproc: int) -> list[float]:
    cfg = {"out": str(tmp_path / f"run{nproc}"), "model": "s2dit-tiny", "codec": "none", "steps": 3,
           "batch_size": 2, "warmup": 1, "checkpoint_every": 100, "log_every": 1,
           "data": {"height": 32, "width": 64, "chunks": 2}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "s2dit_deploy.commands.train", "--json", "pretrain", "--config", str(path), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world"] == nproc
    return result["losses"]


def test_two_processes_match_one_process(tmp_path):
    one = run_pretrain(tmp_path, 1)
    two = run_pretrain(tmp_path, 2)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)
    assert one[0] != one[-1]  # the model did train
