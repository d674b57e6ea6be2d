"""Core ML target: every stage converts (iOS18 ML program, fp16), carries its contract and metadata,
lands in an atomic bundle, and (with the reference executor) reproduces the float stage."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from tests.conftest import psnr
from tests.coreml_helpers import compiled, random_inputs


def _executor_available() -> bool:
    try:
        from s2dit_deploy.targets.coreml.executor import load_program  # noqa: F401
    except ImportError:
        return False
    return True


needs_executor = pytest.mark.skipif(not _executor_available(),
                                    reason="targets/coreml/executor.load_program (reference executor) not available")


@pytest.mark.parametrize("stage_name", ["dit_step", "decoder"])
def test_compile_writes_package_with_metadata(stage_name):
    import coremltools as ct

    stage, art, out = compiled(stage_name)
    pkg = out / f"{stage_name}.mlpackage"
    assert art.files == [f"{stage_name}.mlpackage"] and pkg.is_dir()
    assert art.target == "coreml" and art.contract == stage.contract()
    spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS18
    meta = dict(spec.description.metadata.userDefined)
    for key in ("s2dit.version", "s2dit.layout", "s2dit.schedule", "s2dit.contract", "s2dit.device_io"):
        assert key in meta, key
    assert json.loads(meta["s2dit.contract"]) == json.loads(json.dumps(stage.contract()))
    names = {i.name for i in spec.description.input}
    io = json.loads(meta["s2dit.device_io"])
    assert names == {m["device_name"] for m in io["inputs"]}
    for feat in spec.description.input:  # fp16 I/O, rank <= 4 after the rewrite
        assert len(feat.type.multiArrayType.shape) <= 4, feat.name


@needs_executor
@pytest.mark.parametrize("stage_name,floor", [("dit_step", 50.0), ("decoder", 50.0)])
def test_compiled_stage_matches_float(stage_name, floor):
    from s2dit_deploy.targets.coreml.target import TARGET

    stage, art, out = compiled(stage_name)
    runner = TARGET.load(art, out)
    named = random_inputs(stage)
    ref = stage.run_float(named)
    got = runner.run({k: v.numpy() for k, v in named.items()})
    assert set(got) == set(stage.output_names)
    for k, r in ref.items():
        assert got[k].shape == tuple(r.shape), k
        p = psnr(r, torch.from_numpy(got[k]))
        assert p >= floor, (k, p)


def test_bundle_is_atomic_and_has_manifest(tmp_path):
    from s2dit_deploy.bundle import atomic_bundle, load_bundle

    _, art, out = compiled("decoder")
    with atomic_bundle(tmp_path / "b", "coreml", {"name": "s2dit-tiny"}) as bundle:
        import shutil

        shutil.copytree(out / art.files[0], bundle.path / art.files[0])
        bundle.artifacts["decoder"] = art
    loaded = load_bundle(tmp_path / "b")
    assert loaded.artifacts["decoder"].metadata["device_io"]["inputs"][0]["name"] == "z"


def test_quant_plan_goes_through_the_seam(monkeypatch, tmp_path):
    from s2dit_deploy.targets.coreml import target as tgt

    seen = {}
    fake = types.ModuleType("s2dit_deploy.quant.coreml")

    def apply_plan(mlmodel, plan, stage_name):
        seen["args"] = (plan, stage_name)
        return mlmodel

    fake.apply_plan = apply_plan
    monkeypatch.setitem(sys.modules, "s2dit_deploy.quant.coreml", fake)
    model = object()
    assert tgt.apply_quant_plan(model, None, "decoder") == (model, {})
    out, _ = tgt.apply_quant_plan(model, "PLAN", "decoder")
    assert out is model and seen["args"] == ("PLAN", "decoder")
    monkeypatch.setitem(sys.modules, "s2dit_deploy.quant.coreml", None)
    with pytest.raises(tgt.QuantSeamMissing, match="apply_plan"):
        tgt.apply_quant_plan(model, "PLAN", "decoder")


def test_options_parse_cli_strings():
    from s2dit_deploy.targets.coreml.convert import CoreMLOptions

    o = CoreMLOptions.from_dict({"rewrite": "false", "fold_schedule": "1,0.5,0"})
    assert o.rewrite is False and o.fold_schedule == (1.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="soc"):  # an option of the QNN targets only: no longer ignored
        CoreMLOptions.from_dict({"soc": "SM8750"})
    with pytest.raises(ValueError):
        CoreMLOptions.from_dict({"precision": "int4"})
    with pytest.raises(ValueError):
        CoreMLOptions.from_dict({"rewrite": "maybe"})


def test_target_is_registered():
    from s2dit_deploy.targets.base import get_target

    t = get_target("coreml")
    assert t.name == "coreml" and callable(t.compile) and callable(t.load)


def test_io_maps_roundtrip():
    from s2dit_deploy.rewrites.device_io import IOMap

    m = IOMap("cache.a.kv", "cache__a_kv", (2, 1, 3, 4, 4), (2, 3, 4, 4), (0, 1, 2, 4, 3), 0.25)
    x = np.random.default_rng(0).standard_normal((2, 1, 3, 4, 4)).astype(np.float32)
    d = m.to_device(x)
    assert d.shape == (2, 3, 4, 4) and np.allclose(d[1, 2], x[1, 0, 2].T * 0.25)
    assert np.allclose(m.to_host(d), x)
    assert IOMap.from_dict(json.loads(json.dumps(m.to_dict()))) == m
