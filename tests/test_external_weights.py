"""Weights outside the program: XNNPACK ``.pte`` + ``.ptd`` and ONNX ``.onnx`` + ``.onnx.data``.

Each external build must give the embedded build's numbers (bit-identical or within 1e-6
relative) on the stage's real example inputs and match float; the bundle must list and hash the
data file, and a missing or modified data file must fail loudly, naming the file.
"""

import shutil

import numpy as np
import pytest
import torch
from torch import nn

import s2dit_deploy as sd
from s2dit_deploy.bundle import BundleError, load_bundle, sha256_path
from s2dit_deploy.metrics import psnr
from s2dit_deploy.stages import Stage, TensorSpec, build_stages
from s2dit_deploy.targets.base import TargetOptionError, get_target

STAGE = "text_encoder"  # the s2dit-tiny stage with the most weights (6.4 MB) and the fastest lowering
FLOAT_FLOOR_DB = 60.0
QUANT_FLOOR_DB = 20.0


@pytest.fixture(scope="module")
def stage():
    return build_stages(sd.load_pipeline("s2dit-tiny"), (STAGE,))[STAGE]


def _compile(root, target, mode, **options):
    out = root / f"{target}-{mode}"
    sd.compile("s2dit-tiny", target=target, out_dir=out, stages=(STAGE,), progress=False,
               external_weights=mode, **options)
    return out


def _run(target, bundle_dir, stage):
    b = load_bundle(bundle_dir)
    runner = get_target(target).load(b.artifacts[STAGE], b.path)
    return runner.run({n: t.numpy() for n, t in zip(stage.input_names, stage.example_inputs)})


def _assert_same(ext, emb, what):
    for k in emb:
        scale = max(float(np.abs(emb[k]).max()), 1e-12)
        rel = float(np.abs(ext[k].astype(np.float64) - emb[k]).max()) / scale
        assert rel <= 1e-6, f"{what}: output {k} differs from the embedded build (rel {rel:.2e})"


def _assert_float(got, stage, floor, what):
    ref = stage.run_float(dict(zip(stage.input_names, stage.example_inputs)))
    for k, v in ref.items():
        db = psnr(v.numpy(), got[k])
        assert db >= floor, f"{what}: {k} at {db:.1f} dB vs float, floor {floor}"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- ExecuTorch XNNPACK

@pytest.fixture(scope="module")
def xnn(tmp_path_factory):
    pytest.importorskip("executorch")
    root = tmp_path_factory.mktemp("xnn-ext")
    return {m: _compile(root, "executorch-xnnpack", m) for m in ("always", "never")}


def test_xnnpack_ptd_equals_embedded_pte(xnn, stage):
    ext, emb = load_bundle(xnn["always"]).artifacts[STAGE], load_bundle(xnn["never"]).artifacts[STAGE]
    assert ext.files == [f"{STAGE}.pte", f"{STAGE}.ptd"] and emb.files == [f"{STAGE}.pte"]
    meta = ext.metadata["external_weights"]
    assert meta["external"] and not emb.metadata["external_weights"]["external"]
    # the weights moved: the .ptd holds them, the .pte shrank by about as much
    assert meta["ptd_bytes"] >= meta["weight_bytes"] > 0
    assert ext.metadata["pte_bytes"] + 0.9 * meta["weight_bytes"] <= emb.metadata["pte_bytes"]
    got_ext = _run("executorch-xnnpack", xnn["always"], stage)
    got_emb = _run("executorch-xnnpack", xnn["never"], stage)
    _assert_same(got_ext, got_emb, "xnnpack .ptd")
    _assert_float(got_ext, stage, FLOAT_FLOOR_DB, "xnnpack .ptd")


def test_xnnpack_bundle_hashes_ptd_and_rejects_tampering(xnn, tmp_path):
    b = load_bundle(xnn["always"])
    ptd = f"{STAGE}.ptd"
    assert b.artifacts[STAGE].sha256[ptd] == sha256_path(xnn["always"] / ptd)
    bad = _copy(xnn["always"], tmp_path / "tampered")
    _flip_byte(bad / ptd)
    with pytest.raises(BundleError, match=rf"{ptd} does not match its manifest hash"):
        load_bundle(bad)
    gone = _copy(xnn["always"], tmp_path / "missing")
    (gone / ptd).unlink()
    with pytest.raises(BundleError, match=rf"{ptd} listed in the manifest is missing"):
        load_bundle(gone)
    # past an unverified load, the runner itself names the missing data file
    from s2dit_deploy.targets.xnnpack.runtime import MissingProgramFile

    art = load_bundle(gone, verify=False).artifacts[STAGE]
    with pytest.raises(MissingProgramFile, match=rf"{ptd} is missing.*external weights"):
        get_target("executorch-xnnpack").load(art, gone)


def test_xnnpack_8da4w_with_ptd(xnn, tmp_path, stage):
    """4-bit weights (torchao 8da4w) go through XNNPACK's named data store into the .ptd too."""
    q = {m: _compile(tmp_path, "executorch-xnnpack", m, xnnpack_quant="8da4w") for m in ("always", "never")}
    ext, emb = load_bundle(q["always"]).artifacts[STAGE], load_bundle(q["never"]).artifacts[STAGE]
    assert ext.files == [f"{STAGE}.pte", f"{STAGE}.ptd"] and ext.quant["scheme"] == "8da4w"
    assert ext.metadata["pte_bytes"] < emb.metadata["pte_bytes"] / 2
    got_ext = _run("executorch-xnnpack", q["always"], stage)
    _assert_same(got_ext, _run("executorch-xnnpack", q["never"], stage), "xnnpack 8da4w .ptd")
    _assert_float(got_ext, stage, QUANT_FLOOR_DB, "xnnpack 8da4w .ptd")
    # weights are looked up by name/hash: the float build's .ptd does not serve the 4-bit program
    from s2dit_deploy.targets.xnnpack.runtime import XnnpackRunner

    with pytest.raises(RuntimeError, match=rf"could not load {STAGE}.pte with external weights {STAGE}.ptd"):
        XnnpackRunner(q["always"] / f"{STAGE}.pte", ext.contract, data=xnn["always"] / f"{STAGE}.ptd")


def test_xnnpack_auto_bound():
    from s2dit_deploy.targets.xnnpack.external import use_external
    from s2dit_deploy.targets.xnnpack.options import EXTERNAL_WEIGHTS_BOUND

    assert EXTERNAL_WEIGHTS_BOUND < 2**31
    assert not use_external("auto", EXTERNAL_WEIGHTS_BOUND)
    assert use_external("auto", EXTERNAL_WEIGHTS_BOUND + 1)
    assert use_external("always", 1) and not use_external("never", 2**33)
    with pytest.raises(TargetOptionError, match="external_weights.*auto, always, never"):
        get_target("executorch-xnnpack").parse_options({"external_weights": "sometimes"})


# ---------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def ort_bundles(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("onnx-ext")
    return {m: _compile(root, "onnx", m) for m in ("always", "never")}


def test_onnx_external_data_equals_embedded(ort_bundles, stage):
    ext, emb = load_bundle(ort_bundles["always"]).artifacts[STAGE], load_bundle(ort_bundles["never"]).artifacts[STAGE]
    data = f"{STAGE}.onnx.data"
    assert ext.files == [f"{STAGE}.onnx", data] and emb.files == [f"{STAGE}.onnx"]
    assert ext.metadata["external_weights"]["data_bytes"] >= 0.9 * ext.metadata["external_weights"]["weight_bytes"]
    model_bytes = (ort_bundles["always"] / f"{STAGE}.onnx").stat().st_size
    assert model_bytes + 0.9 * ext.metadata["external_weights"]["data_bytes"] <= \
        (ort_bundles["never"] / f"{STAGE}.onnx").stat().st_size
    got_ext = _run("onnx", ort_bundles["always"], stage)
    _assert_same(got_ext, _run("onnx", ort_bundles["never"], stage), "onnx external data")
    _assert_float(got_ext, stage, FLOAT_FLOOR_DB, "onnx external data")


def test_onnx_bundle_hashes_data_and_rejects_tampering(ort_bundles, tmp_path):
    data = f"{STAGE}.onnx.data"
    b = load_bundle(ort_bundles["always"])
    assert b.artifacts[STAGE].sha256[data] == sha256_path(ort_bundles["always"] / data)
    bad = _copy(ort_bundles["always"], tmp_path / "tampered")
    _flip_byte(bad / data)
    with pytest.raises(BundleError, match=rf"{data} does not match its manifest hash"):
        load_bundle(bad)
    gone = _copy(ort_bundles["always"], tmp_path / "missing")
    (gone / data).unlink()
    with pytest.raises(BundleError, match=rf"{data} listed in the manifest is missing"):
        load_bundle(gone)
    art = load_bundle(gone, verify=False).artifacts[STAGE]
    with pytest.raises(BundleError, match=rf"{data} is missing: {STAGE}.onnx keeps its weights there"):
        get_target("onnx").load(art, gone)


def test_externalize_streams_scattered_files(tmp_path):
    """Per-tensor files (what the TorchScript exporter writes above 2 GiB) become one aligned file."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx.external_data_helper import convert_model_to_external_data

    from s2dit_deploy.targets.onnx.external import ALIGN, externalize, uses_external_data

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    x = torch.randn(3, 64)
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    torch.onnx.export(m, (x,), str(src), dynamo=False, input_names=["x"], output_names=["y"], opset_version=20)
    model = onnx.load(str(src))
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0)
    onnx.save_model(model, str(src))
    assert len(uses_external_data(onnx.load(str(src), load_external_data=False))) >= 4
    info = externalize(src, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["m.onnx", "m.onnx.data"]
    assert list((tmp_path / "src").iterdir()) == []  # the scattered files were consumed
    out = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert uses_external_data(out) == ["m.onnx.data"] and info["tensors"] >= 4
    offsets = [int(e.value) for t in out.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % ALIGN == 0 for o in offsets)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert psnr(ref, y) >= 100.0


def test_onnx_never_refuses_weights_past_protobuf_limit():
    from s2dit_deploy.targets.onnx.export import want_external
    from s2dit_deploy.targets.onnx.options import EXTERNAL_WEIGHTS_BOUND

    big = nn.Linear(32768, 16384, bias=False, device="meta")  # 2 GiB of fp32, never allocated
    x = torch.empty(1, 32768, device="meta")
    st = Stage("huge", big, (x,), (TensorSpec("x", (1, 32768), "float32"),),
               (TensorSpec("y", (1, 16384), "float32"),), ())
    with pytest.raises(TargetOptionError, match="external_weights.*huge has 2.00 GiB.*2 GiB"):
        want_external("never", st)
    assert want_external("auto", st) and EXTERNAL_WEIGHTS_BOUND < 2**31
    assert not want_external("auto", st, bound=2**32)


def test_onnx_qnn_context_binary_and_qdq_data_outside(tmp_path, stage):
    """onnx-qnn: the QDQ model's weights in .qdq.onnx.data, the HTP context binary in a .bin beside
    the EPContext model (embed_mode=0); HTP emulation gives the embedded build's numbers."""
    pytest.importorskip("onnxruntime_qnn")
    q = {m: _compile(tmp_path, "onnx-qnn", m) for m in ("always", "never")}
    ext, emb = load_bundle(q["always"]).artifacts[STAGE], load_bundle(q["never"]).artifacts[STAGE]
    base = f"{STAGE}.sm8750"
    assert ext.files == [f"{base}.ctx.onnx", f"{base}.qdq.onnx", f"{base}.ctx_qnn.bin", f"{base}.qdq.onnx.data"]
    assert emb.files == [f"{base}.ctx.onnx", f"{base}.qdq.onnx"]
    # the EPContext model keeps only the binary's name; the embedded one carries the binary
    assert (q["always"] / f"{base}.ctx.onnx").stat().st_size < 64 * 1024
    assert (q["never"] / f"{base}.ctx.onnx").stat().st_size >= (q["always"] / f"{base}.ctx_qnn.bin").stat().st_size
    got_ext = _run("onnx-qnn", q["always"], stage)
    _assert_same(got_ext, _run("onnx-qnn", q["never"], stage), "onnx-qnn external context")
    _assert_float(got_ext, stage, QUANT_FLOOR_DB, "onnx-qnn external context")
    gone = _copy(q["always"], tmp_path / "missing")
    (gone / f"{base}.ctx_qnn.bin").unlink()
    art = load_bundle(gone, verify=False).artifacts[STAGE]
    with pytest.raises(BundleError, match=rf"{base}.ctx_qnn.bin is missing: .*QNN context binary"):
        get_target("onnx-qnn").load(art, gone)


def test_externalize_moves_typed_int8_weights(tmp_path):
    """The QDQ tools store int8 weights in ``int32_data`` (4 bytes per value); those go out too."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from s2dit_deploy.targets.onnx.external import externalize, uses_external_data

    w = np.random.default_rng(0).integers(-128, 128, size=(64, 64), dtype=np.int8)
    init = helper.make_tensor("W", TensorProto.INT8, w.shape, w.flatten().tolist())
    assert not init.HasField("raw_data") and len(init.int32_data) == w.size
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("Add", ["Wf", "X"], ["Y"])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [64, 64])], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save_model(model, str(tmp_path / "src.onnx"))
    info = externalize(tmp_path / "src.onnx", tmp_path / "m.onnx")
    assert info["tensors"] == 1 and info["data_bytes"] == w.size  # raw int8, no longer 4 bytes each
    assert uses_external_data(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)) == ["m.onnx.data"]
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_array_equal(y, w.astype(np.float32) + x)
