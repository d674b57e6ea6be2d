"""One target interface: declared options (parsed, checked, described) and declared capabilities.

Nothing here imports a toolchain: options live in light ``targets/<name>/options.py`` modules.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from s2dit_deploy.errors import InputError, ToolchainUnavailable, UsageError
from s2dit_deploy.targets import base
from s2dit_deploy.targets.base import (
    TARGETS,
    BaseTarget,
    QuantPreset,
    TargetOptionError,
    describe_options,
    options_class,
    parse_options,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", list(TARGETS))
def test_unknown_option_key_is_rejected_on_every_target(target):
    with pytest.raises(InputError) as err:
        parse_options(options_class(target), {"precison": "fp32"}, target)
    msg = str(err.value)
    assert "'precison'" in msg and target in msg and "precision" in msg  # names key, target, valid keys


@pytest.mark.parametrize("target", list(TARGETS))
def test_describe_options_lists_every_field_with_its_doc(target):
    rows = describe_options(target)
    names = [f.name for f in dataclasses.fields(options_class(target))]
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert set(r) == {"name", "type", "default", "doc", "choices"}
        assert r["doc"].strip(), f"{target}.{r['name']} has no doc"
    precision = next(r for r in rows if r["name"] == "precision")
    assert set(precision["choices"]) <= {"fp16", "fp32"}  # compute precision everywhere, never a quant preset


def test_describe_options_imports_no_toolchain():
    code = ("import sys; from s2dit_deploy.targets.base import describe_options, TARGETS\n"
            "[describe_options(t) for t in TARGETS]\n"
            "heavy = [m for m in ('coremltools', 'executorch', 'onnxruntime', 'onnx') if m in sys.modules]\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_bool_parsing():
    cls = options_class("executorch-xnnpack")
    assert parse_options(cls, {"etrecord": "false"}, "executorch-xnnpack").etrecord is False
    assert parse_options(cls, {"etrecord": "0"}, "executorch-xnnpack").etrecord is False
    assert parse_options(cls, {"etrecord": "yes"}, "executorch-xnnpack").etrecord is True
    assert parse_options(cls, {"etrecord": True}, "executorch-xnnpack").etrecord is True
    with pytest.raises(TargetOptionError, match="'etrecord'.*boolean.*'maybe'"):
        parse_options(cls, {"etrecord": "maybe"}, "executorch-xnnpack")


def test_calibration_batches_is_an_int_option():
    cls = options_class("executorch-xnnpack")
    assert parse_options(cls, {"calibration_batches": "4"}, "executorch-xnnpack").calibration_batches == 4
    for bad in ("four", "2.5", 0):
        with pytest.raises(TargetOptionError, match="calibration_batches"):
            parse_options(cls, {"calibration_batches": bad}, "executorch-xnnpack")


def test_enum_values_and_context_keys():
    cls = options_class("coreml")
    with pytest.raises(TargetOptionError, match="fp16, fp32"):
        parse_options(cls, {"precision": "int4"}, "coreml")
    # the compiler's own entries travel with the options but are not options
    assert parse_options(cls, {"pipeline": object(), "calibration": {}}, "coreml") == cls()


def test_soc_is_a_qnn_option_only_and_validated():
    assert parse_options(options_class("executorch-qnn"), {"soc": "sm8650"}, "executorch-qnn").soc == "SM8650"
    with pytest.raises(InputError, match="SM0000"):
        parse_options(options_class("onnx-qnn"), {"soc": "SM0000"}, "onnx-qnn")
    for target in ("coreml", "executorch-xnnpack", "onnx"):
        with pytest.raises(TargetOptionError, match="'soc'"):
            parse_options(options_class(target), {"soc": "SM8750"}, target)


def test_qnn_quant_presets_come_from_quant():
    from s2dit_deploy.compiler import resolve_plan

    assert base.quant_presets("executorch-qnn") == ("8a8w", "16a8w", "16a4w", "8a4w", "16a16w")
    assert resolve_plan("8a8w", None, "executorch-qnn") == QuantPreset("8a8w")  # no calibration run needed
    with pytest.raises(TargetOptionError, match="precision"):  # no longer a precision value
        parse_options(options_class("executorch-qnn"), {"precision": "8a8w"}, "executorch-qnn")


def test_quantized_htp_spec_is_not_fp16():
    pytest.importorskip("torch")
    from s2dit_deploy.targets.qnn.lower import htp_spec_args

    assert htp_spec_args("fp16") == {"use_fp16": True}
    assert htp_spec_args("8a8w") == {"use_fp16": False}
    assert htp_spec_args("fp16", plan=object()) == {"use_fp16": False}  # a plan quantizes the graph


def test_xnnpack_scheme_list_matches_the_quantizer():
    pytest.importorskip("executorch")
    from s2dit_deploy.targets.xnnpack import options, quantize

    assert options.SCHEMES == quantize.SCHEMES


def test_unknown_target_is_a_usage_error():
    with pytest.raises(UsageError, match="coreml"):
        base.get_target("corml")
    with pytest.raises(UsageError):
        describe_options("corml")
    assert issubclass(base.TargetUnavailable, ToolchainUnavailable)


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_target_derives_from_base_and_declares_capabilities(target):
    try:
        tgt = base.get_target(target)
    except ToolchainUnavailable as exc:
        pytest.skip(str(exc))
    assert isinstance(tgt, BaseTarget) and tgt.name == target
    assert tgt.options_cls is options_class(target)
    assert isinstance(tgt.capabilities, frozenset) and tgt.capabilities <= base.CAPABILITIES
    with pytest.raises(InputError, match="precison"):
        tgt.parse_options({"precison": "fp32"})
    floors = tgt.default_floors(type("A", (), {"quant": {}, "metadata": {}, "stage": "dit_step"})())
    assert set(floors) == {"*", "stream"} and all(10 < v < 80 for v in floors.values())


def test_default_floors_follow_precision_and_quant():
    from s2dit_deploy.targets.floors import default_floors

    def art(quant=None, **meta):
        return type("A", (), {"quant": quant or {}, "metadata": meta, "stage": "dit_step"})()

    assert default_floors("onnx", art())["*"] == 60.0
    assert default_floors("coreml", art(compute_precision="fp16"))["*"] == 50.0
    assert default_floors("executorch-qnn", art({"scheme": "pt2e-qnn", "preset": "8a8w"}))["*"] == 25.0
    assert default_floors("executorch-xnnpack", art({"plan": "w8a8"}))["*"] == 35.0
    assert default_floors("coreml", art({"plan": "w4a8-mixed"}))["*"] == 20.0
    assert default_floors("onnx", art())["stream"] > 9.0  # a bundle swapped for other weights (9 dB) fails


def test_no_capability_probes_left():
    for rel in ("bench/harness.py", "s2dit_deploy/host.py"):
        assert not re.search(r"\bhasattr\(", (ROOT / rel).read_text()), rel


def test_check_plan_reports_quantized_layers_left_unmatched():
    from s2dit_deploy.quant.plan import LayerQuant, QuantPlan
    from s2dit_deploy.targets.floors import unmatched_plan_layers

    plan = QuantPlan("p", "m", {"dit_step": {"a": LayerQuant("int8-pc"), "b": LayerQuant("fp16"),
                                             "c": LayerQuant("int8-pc")}})
    art = type("A", (), {"stage": "dit_step", "metadata": {}, "quant": {"unmatched_layers": ["b", "c"]}})()
    assert unmatched_plan_layers(art, plan) == ["dit_step:c: planned int8-pc, no matching weight in the artifact"]
    assert unmatched_plan_layers(art, QuantPreset("8a8w")) == []
