"""Self-contained bundles: host_loop.json, tables, tokenizer.json and the standalone reference host.

The standalone host runs in a subprocess where any import of s2dit_deploy raises, and must give
the frames ``s2dit-deploy generate --bundle`` writes (uint8, max difference <= 1)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import s2dit_deploy as sd
from s2dit_deploy.app_bundle import host_loop, tokenizer_asset
from s2dit_deploy.app_bundle.host_loop import HostLoopError, load_host_loop
from s2dit_deploy.bundle import BundleError, load_bundle
from s2dit_deploy.cli import main as cli_main
from s2dit_deploy.errors import CompileCheckError
from s2dit_deploy.model_zoo import portable_rng
from s2dit_deploy.model_zoo.rope import rope_angles, rope_columns
from s2dit_deploy.model_zoo.tokenizer import tokenize

ROOT = Path(__file__).resolve().parents[1]
EXECUTOR_DIR = ROOT / "targets" / "coreml"
PROMPT = "Café, déjà vu 🌸 a fox in the snow"
# runs a script with every s2dit-deploy import blocked: the host must need nothing of ours
BLOCKED_RUN = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("s2dit_deploy", "model_zoo", "targets", "quant"):
            raise ImportError("standalone host imported " + name)
sys.meta_path.insert(0, Block())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _compile(tmp_path_factory, target):
    out = tmp_path_factory.mktemp(target) / "bundle"
    sd.compile("s2dit-tiny", target=target, out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return _compile(tmp_path_factory, "onnx")


@pytest.fixture(scope="module")
def coreml_bundle(tiny_coreml_export):
    return tiny_coreml_export[0] / "bundle"  # the export's bundle: a plain s2dit-tiny coreml compile


@pytest.fixture(params=["onnx", "executorch-xnnpack", "coreml", "coreai"])
def bundle(request):
    name = {"onnx": "onnx_bundle", "executorch-xnnpack": "tiny_xnnpack_bundle", "coreml": "coreml_bundle",
            "coreai": "tiny_coreai_bundle"}
    return request.getfixturevalue(name[request.param])


def run_standalone(bundle_dir: Path, *args: str) -> subprocess.CompletedProcess:
    host = bundle_dir / "host" / "reference_host.py"
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(host), str(bundle_dir), *args,
                           "--coreml-executor", str(EXECUTOR_DIR)], capture_output=True, text=True, timeout=600)


def test_standalone_host_gives_the_frames_of_generate(bundle, tmp_path):
    ours = tmp_path / "generate.npy"
    assert cli_main(["generate", PROMPT, "--bundle", str(bundle), "--chunks", "2", "--seed", "3", "-o", str(ours),
                     "--json"]) == 0
    res = run_standalone(bundle, PROMPT, "--chunks", "2", "--seed", "3", "-o", str(tmp_path / "ref.npy"))
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = np.load(ours).astype(np.int16), np.load(tmp_path / "ref.npy").astype(np.int16)
    assert a.shape == b.shape == (24, 64, 128, 3)
    assert np.abs(a - b).max() <= 1
    assert a.std() > 5  # real frames, not a constant image


def test_host_loop_validates_against_its_schema_and_is_hashed(bundle):
    spec = json.loads((bundle / host_loop.HOST_LOOP_FILE).read_text())
    jsonschema.Draft202012Validator(host_loop.schema()).validate(spec)
    files = load_bundle(bundle).files
    for rel in ["host/host_loop.json", "host/tokenizer.json", "host/reference_host.py", "host/portable_rng.py",
                "INTEGRATION.md", *(t["file"] for t in spec["tables"].values())]:
        assert rel in files, rel
    assert set(spec["schedule"]["rows"]) == {"1", "2", "4"}
    info = load_bundle(bundle).info["host_assets"]
    assert info["io"]["dit_step"]["device_inputs"] == len(spec["stages"]["dit_step"]["inputs"])
    assert info["io"]["dit_step"]["converted_per_call_after"] <= info["io"]["dit_step"]["converted_per_call_before"]


def test_integration_notes_name_every_device_tensor(bundle):
    spec = json.loads((bundle / host_loop.HOST_LOOP_FILE).read_text())
    notes = (bundle / "INTEGRATION.md").read_text()
    for stage in spec["stages"].values():
        for t in [*stage["inputs"], *stage["outputs"]]:
            assert f"`{t['device_name']}`" in notes
    assert {"coreml": "MLModel", "onnx": "InferenceSession", "executorch-xnnpack": "Module ",
            "coreai": "load_function"}[spec["target"]] in notes


def test_coreml_caches_stay_in_device_form(coreml_bundle):
    """Core ML caches roll on fp16 device arrays (scale and layout kept) and context / RoPE are folded
    (fold_io): no dit_step tensor needs a host-side transpose or scale per call."""
    spec = json.loads((coreml_bundle / host_loop.HOST_LOOP_FILE).read_text())
    rules = {r["input"]: r for r in spec["state"]["dit_step"]}
    kv = next(i for i in spec["stages"]["dit_step"]["inputs"] if i["name"].endswith(".kv"))
    assert kv["device_dtype"] == "float16" and kv["transform"]["scale"] < 1 and kv["transform"]["perm"]
    assert rules[kv["name"]]["rule"] == "window_roll"
    io = load_bundle(coreml_bundle).info["host_assets"]["io"]["dit_step"]
    assert io["converted_per_call_before"] > 20 and io["converted_per_call_after"] == 0


def test_bundled_tokenizer_gives_the_project_ids(onnx_bundle):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(onnx_bundle / "host" / "tokenizer.json"))
    for prompt in [*tokenizer_asset.CHECK_PROMPTS, "Ünïcödé ümläuts ß", "東京タワー at night", "emoji 🦊🔥"]:
        assert tok.encode(tokenizer_asset.clean(prompt)).ids == tokenize(prompt)[0].tolist(), prompt


def test_a_tokenizer_that_disagrees_fails_the_compile(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(tokenizer_asset, "clean", lambda text: text[::-1])
    with pytest.raises(CompileCheckError, match="does not reproduce the project's token ids"):
        sd.compile("s2dit-tiny", target="onnx", out_dir=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial.*"))


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_unknown_host_loop_version_is_refused_with_both_versions(onnx_bundle, tmp_path):
    b = _copy(onnx_bundle, tmp_path)
    spec_path = b / host_loop.HOST_LOOP_FILE
    spec = json.loads(spec_path.read_text())
    spec["version"] = 7
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(HostLoopError, match="version 7.*knows version 1"):
        load_host_loop(b)
    res = run_standalone(b, "a prompt", "--chunks", "1", "-o", str(tmp_path / "f.npy"))
    assert res.returncode == 2 and "version 7" in res.stderr and "version 1" in res.stderr
    with pytest.raises(BundleError):  # the manifest hash catches the edit too
        load_bundle(b)


def test_a_missing_table_is_named(onnx_bundle, tmp_path):
    b = _copy(onnx_bundle, tmp_path)
    (b / "host" / "tables" / "rope.hi.pos.bin").unlink()
    with pytest.raises(HostLoopError, match="rope.hi.pos.bin"):
        load_host_loop(b)
    res = run_standalone(b, "a prompt", "--chunks", "1", "-o", str(tmp_path / "f.npy"))
    assert res.returncode == 2 and "host/tables/rope.hi.pos.bin is missing" in res.stderr


def test_a_wrong_roll_rule_is_caught_before_writing(onnx_bundle):
    art = load_bundle(onnx_bundle).artifacts["dit_step"]
    spec, ins, outs = host_loop.stage_spec("dit_step", art, "onnx")
    rules = host_loop.state_rules("dit_step", ins, outs, art.contract["state_pairs"])
    host_loop.check_rules(rules, ins, outs)
    bad = [dict(r, axis=r["axis"] + 1) if r["rule"] == "window_roll" and r["axis"] == 2 else r for r in rules]
    with pytest.raises(BundleError, match="disagrees with model_zoo.cache.push_entries"):
        host_loop.check_rules(bad, ins, outs)


def test_rope_columns_reproduce_rope_angles_exactly():
    for grid, d in [((3, 4, 6), 24), ((3, 2, 3), 64)]:
        pos, freq, is_time = rope_columns(grid, d)
        for offset in (0, 12, 1212, 99996):
            want = rope_angles(grid, d, 10000.0, offset).numpy()
            np.testing.assert_array_equal((pos + np.float32(offset) * is_time) * freq, want)


def test_portable_rng_is_pinned_and_addressed_by_chunk_and_draw():
    # apps reproduce these numbers: a change here breaks every shipped app's frames
    np.testing.assert_array_equal(portable_rng.normal(0, 0, 0, (5,)), np.array(
        [1.4032894372940063, 0.8699606657028198, -1.4379644393920898, -0.6360762119293213, -0.8220022320747375],
        dtype=np.float32))
    a = portable_rng.normal(5, 1, 0, (2, 3, 7))
    assert a.dtype == np.float32 and a.shape == (2, 3, 7)
    np.testing.assert_array_equal(a, portable_rng.normal(5, 1, 0, (2, 3, 7)))
    assert not np.array_equal(a, portable_rng.normal(5, 1, 1, (2, 3, 7)))
    assert not np.array_equal(a, portable_rng.normal(5, 2, 0, (2, 3, 7)))
    big = portable_rng.normal(1, 0, 0, (200_000,))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    with pytest.raises(ValueError, match="draw"):
        portable_rng.normal(0, 0, 256, (2,))
