"""Sharded QNN dit_step (N chained .pte files along the DiT groups) equals the unsharded one under
HTP emulation; the bundle lists and hashes every shard file; bad shard counts are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from s2dit_deploy.metrics import psnr
from tests.coreml_helpers import random_inputs


def _stage():
    from s2dit_deploy.stages import build_stages
    from tests.coreml_helpers import tiny_pipeline

    return build_stages(tiny_pipeline(blocks_per_group=1), ("dit_step",))["dit_step"]  # 4 groups, 1 block each


def _bundle(tgt, stage, folder, shards):
    """A one-stage bundle as compile_model writes it (sharded through the compiler's own helper)."""
    from s2dit_deploy.bundle import atomic_bundle
    from s2dit_deploy.targets.sharding import compile_sharded

    with atomic_bundle(folder, tgt.name, {"name": "s2dit-tiny", "config": {}, "checkpoint": {
            "source": "seeded", "name": None, "sha256": None}}) as bundle:
        art = (compile_sharded(tgt, stage, None, bundle.path, {}, shards) if shards > 1
               else tgt.compile(stage, None, bundle.path, {}))
        bundle.artifacts[stage.name] = art
    return folder


@pytest.fixture(scope="module")
def bundles(qnn, tmp_path_factory):
    root = tmp_path_factory.mktemp("qnn-shards")
    stage = _stage()
    return stage, _bundle(qnn, stage, root / "whole", 1), _bundle(qnn, stage, root / "sharded", 2)


def test_sharded_equals_unsharded_under_emulation(bundles, qnn):
    from s2dit_deploy.bundle import load_bundle

    stage, whole_dir, sharded_dir = bundles
    whole, sharded = load_bundle(whole_dir), load_bundle(sharded_dir)  # hashes verified on load
    art = sharded.artifacts["dit_step"]
    assert art.metadata["shard_count"] == 2 and len(art.files) == 2
    assert all(f.startswith(f"dit_step.shard{k}/") for k, f in enumerate(art.files))
    assert set(art.sha256) == set(art.files)
    assert len(whole.artifacts["dit_step"].files) == 1 and "shards" not in whole.artifacts["dit_step"].metadata
    named = random_inputs(stage)
    feed = {k: v.numpy() for k, v in named.items()}
    a = qnn.load(whole.artifacts["dit_step"], whole.path).run(feed)
    b = qnn.load(art, sharded.path).run(feed)
    ref = stage.run_float(named)
    for k in stage.output_names:
        # the tensors between shards travel in fp32 where one graph keeps them in fp16: near, not equal
        assert psnr(a[k], b[k]) > 55.0, k
        assert psnr(ref[k].numpy(), b[k]) > 50.0, k


def test_manifest_shard_folder_cannot_leave_the_bundle(bundles, tmp_path):
    import shutil

    from s2dit_deploy.bundle import load_bundle
    from s2dit_deploy.errors import InputError
    from s2dit_deploy.targets.base import get_target

    copy = tmp_path / "edited"
    shutil.copytree(bundles[2], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["dit_step"]["metadata"]["shards"][1]["folder"] = "../outside"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(copy)
    with pytest.raises(InputError, match="shards\\[1\\].folder"):
        get_target("executorch-qnn").load(bundle.artifacts["dit_step"], bundle.path)


@pytest.mark.parametrize("value,match", [("-1", "shards must be >= 0"), ("0.5", "shards")])
def test_bad_shard_option(value, match):
    from s2dit_deploy.targets.base import TargetOptionError, parse_options
    from s2dit_deploy.targets.qnn.options import QnnOptions

    with pytest.raises(TargetOptionError, match=match):
        parse_options(QnnOptions, {"shards": value}, "executorch-qnn")


def test_more_shards_than_groups_is_refused(qnn, tmp_path):
    from s2dit_deploy.compiler import compile_model
    from s2dit_deploy.rewrites.graph_split import SplitError

    with pytest.raises(SplitError, match="at most 4"):
        compile_model("s2dit-tiny", "executorch-qnn", stages=("dit_step",), out_dir=tmp_path / "x",
                      progress=False, shards=5)
    assert not (tmp_path / "x").exists()
