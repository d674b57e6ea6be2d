"""Chunked Core ML dit_step (one ML program per group range, chained by the host) equals the
unchunked program under the reference executor, and both match the float stage."""

import numpy as np
import pytest

from tests.conftest import psnr
from tests.coreml_helpers import compiled, random_inputs

pytest.importorskip("coremltools")


def _run(stage_name, options):
    from s2dit_deploy.targets.coreml.target import TARGET

    stage, art, out = compiled(stage_name, options)
    named = random_inputs(stage)
    got = TARGET.load(art, out).run({k: v.numpy() for k, v in named.items()})
    return stage, art, out, named, got


def test_chunked_equals_unchunked():
    import torch

    stage, whole, _, named, ref_prog = _run("dit_step", ())
    _, art, out, _, got = _run("dit_step", (("chunks", 2),))
    assert art.files == ["dit_step.0.mlpackage", "dit_step.1.mlpackage"]
    assert all((out / f).is_dir() for f in art.files)
    chunks = art.metadata["chunks"]
    assert [c["groups"] for c in chunks][0][0] == 0 and chunks[-1]["groups"][1] == len(stage.module.dit.sandwich.groups)
    assert any(n.startswith("carry.") for n in chunks[1]["inputs"])
    ref = stage.run_float(named)
    for k in stage.output_names:
        # the boundary tensors travel in fp16 exactly as they do inside one fp16 program
        assert psnr(torch.from_numpy(ref_prog[k]), torch.from_numpy(got[k])) > 60.0, k
        assert psnr(ref[k], torch.from_numpy(got[k])) > 45.0, k
    assert np.isfinite(got["velocity"]).all()


def test_auto_chunking_follows_the_bound():
    stage, art, out, _, _ = _run("dit_step", (("chunk_mb", 0.05),))  # 50 kB: the tiny DiT needs several
    assert len(art.files) == len(art.metadata["chunks"]) >= 2
    _, whole, _, _, _ = _run("dit_step", ())
    assert whole.files == ["dit_step.mlpackage"] and "chunks" not in whole.metadata


def test_bad_chunk_options_are_refused():
    from s2dit_deploy.targets.base import TargetOptionError
    from s2dit_deploy.targets.coreml.options import CoreMLOptions

    with pytest.raises(TargetOptionError, match="chunks must be >= 0"):
        CoreMLOptions.from_dict({"chunks": "-1"})
    with pytest.raises(TargetOptionError, match="chunk_mb"):
        CoreMLOptions.from_dict({"chunk_mb": "0"})


def test_chunks_load_one_at_a_time_above_the_bound(monkeypatch):
    """Large chunked programs are loaded per run (bounded memory) and give the same outputs."""
    from s2dit_deploy.targets.coreml import chunks
    from s2dit_deploy.targets.coreml.target import TARGET

    stage, art, out, named, kept = _run("dit_step", (("chunks", 2),))
    monkeypatch.setattr(chunks, "KEEP_LOADED_BYTES", 0)
    runner = TARGET.load(art, out)
    assert not runner.program.keep_loaded and all(p.program is None for p in runner.program.pieces)
    got = runner.run({k: v.numpy() for k, v in named.items()})
    for k in stage.output_names:
        np.testing.assert_array_equal(kept[k], got[k])
