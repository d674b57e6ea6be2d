"""config.json is validated before any work: every bad field gets an InputError naming it."""

import json
import subprocess
import sys
import textwrap

import pytest

from s2dit_deploy.errors import InputError
from s2dit_deploy.model_zoo.checkpoint import CheckpointError, read_config
from s2dit_deploy.model_zoo.config import DiTConfig, MAX_LAYOUT_GROUPS, ModelConfig
from s2dit_deploy.model_zoo.registry import get_card, load_stage


def _tiny():
    return get_card("s2dit-tiny").config.to_dict()


def _write(tmp_path, doc):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


def _set(doc, dotted, value):
    *head, last = dotted.split(".")
    node = doc
    for key in head:
        node = node[key]
    node[last] = value
    return doc


@pytest.mark.parametrize("field, value", [
    ("dit.dim", "32"), ("dit.dim", 32.0), ("dit.dim", True), ("dit.dim", 0), ("dit.ffn_dim", -4),
    ("dit.ffn_dim", 1e6), ("dit.ffn_dim", 10**9), ("dit.layout", "L" * 100_000), ("dit.layout", 7),
    ("dit.patch_size", [1, 2]), ("dit.rope_theta", "big"), ("dit.search", 1),
    ("text_encoder.hidden_size", None), ("decoder.channels", [16, 16, 8, "4"]), ("decoder.groups", 0),
    ("stream.chunk_frames", 0), ("fps", 0), ("fps", -1), ("fps", 16.5), ("steps", 3), ("steps", 0),
    ("height", 40), ("width", 0), ("height", "64"), ("name", ""),
])
def test_bad_field_is_named(tmp_path, field, value):
    folder = _write(tmp_path, _set(_tiny(), field, value))
    with pytest.raises(CheckpointError) as info:
        read_config(folder)
    message = str(info.value)
    assert field.split(".")[-1] in message and "config.json" in message
    if "." in field:
        assert field in message or field.split(".")[0] in message
    assert isinstance(info.value, InputError)


def test_message_names_field_type_and_value(tmp_path):
    with pytest.raises(CheckpointError, match=r"dit\.dim must be a positive integer, got '32' \(str\)"):
        read_config(_write(tmp_path, _set(_tiny(), "dit.dim", "32")))


@pytest.mark.parametrize("doc, match", [
    ([1, 2], "JSON object.*got list"), (None, "JSON object.*got null"), ({"name": "x"}, "missing required keys"),
    ({**_tiny(), "dit": [1]}, "dit must be a JSON object"), ({**_tiny(), "bogus": 1}, "unknown config keys"),
])
def test_bad_document_shape(tmp_path, doc, match):
    with pytest.raises(CheckpointError, match=match):
        read_config(_write(tmp_path, doc))


def test_layout_bound_is_a_named_constant():
    base = dict(dim=32, num_heads=2, ffn_dim=64, text_dim=32)
    DiTConfig(layout="L" * MAX_LAYOUT_GROUPS, **base)
    with pytest.raises(InputError, match="MAX_LAYOUT_GROUPS"):
        DiTConfig(layout="L" * (MAX_LAYOUT_GROUPS + 1), **base)


def test_python_built_configs_are_checked_and_lists_still_work():
    with pytest.raises(InputError, match=r"dit\.dim"):
        DiTConfig(dim="32", num_heads=2, ffn_dim=64, layout="LSSL", text_dim=32)
    cfg = DiTConfig(dim=32, num_heads=2, ffn_dim=64, layout="LSSL", text_dim=32, patch_size=[1, 2, 2])
    assert cfg.patch_size == (1, 2, 2)
    assert ModelConfig.from_dict(_tiny()) == get_card("s2dit-tiny").config


def test_steps_come_from_the_sampler():
    from s2dit_deploy.model_zoo.sampler import SUPPORTED_STEPS

    doc = _tiny()
    for steps in SUPPORTED_STEPS:
        assert ModelConfig.from_dict({**doc, "steps": steps}).steps == steps
    with pytest.raises(InputError, match="steps must be one of"):
        ModelConfig.from_dict({**doc, "steps": max(SUPPORTED_STEPS) + 1})


def test_shapes_disagreeing_with_headers_fail_before_build(tmp_path, monkeypatch):
    from s2dit_deploy.model_zoo import checkpoint, registry

    cfg = get_card("s2dit-tiny").config
    folder = checkpoint.save_checkpoint(tmp_path / "c", cfg, {"dit": load_stage(cfg, None, "dit")})
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(_set(doc, "dit.ffn_dim", 60000)))
    built = []
    real = registry.build_stage
    monkeypatch.setattr(registry, "build_stage", lambda c, s: built.append(str(__import__("torch").empty(0).device))
                        or real(c, s))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        registry.load_model("s2dit-tiny", checkpoint=folder)
    assert built == ["meta"]  # only the meta-device build ran


HUGE = textwrap.dedent("""
    import json, resource, sys, time
    from s2dit_deploy.model_zoo.registry import get_card, load_stage, resolve
    from s2dit_deploy.model_zoo.checkpoint import save_checkpoint
    from s2dit_deploy.errors import InputError
    cfg = get_card("s2dit-tiny").config
    folder = save_checkpoint(sys.argv[1], cfg, {"dit": load_stage(cfg, None, "dit")})
    doc = json.loads((folder / "config.json").read_text())
    results = []
    for key, value in [("ffn_dim", 1000000), ("ffn_dim", 60000), ("layout", "L" * 100000), ("dim", 60000)]:
        d = json.loads(json.dumps(doc)); d["dit"][key] = value
        if key == "dim": d["dit"]["num_heads"] = 2
        (folder / "config.json").write_text(json.dumps(d))
        t = time.perf_counter()
        try:
            load_stage(*resolve("s2dit-tiny", folder), "dit")
            results.append("loaded")
        except InputError as exc:
            results.append(type(exc).__name__)
        results.append(time.perf_counter() - t)
    # seeded (no weights): the same sizes are bounded without headers
    import dataclasses
    for key, value in [("ffn_dim", 1000000), ("dim", 60000)]:
        try:
            d = dataclasses.replace(cfg.dit, **{key: value})
            load_stage(dataclasses.replace(cfg, dit=d), None, "dit")
            results.append("loaded")
        except InputError as exc:
            results.append(type(exc).__name__)
    # VmHWM is this process's own peak: ru_maxrss keeps the forking parent's peak across exec
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"results": results, "rss_kb": hwm}))
""")


def test_huge_dimensions_fail_before_allocating(tmp_path):
    out = subprocess.run([sys.executable, "-c", HUGE, str(tmp_path / "huge")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    results = report["results"]
    assert "loaded" not in results, results
    assert all(t < 5 for t in results[1:8:2]), results
    assert report["rss_kb"] < 1_000_000, report  # < 1 GB peak: nothing big was allocated
