"""The compile memory budget: a per-stage peak estimate, and a clear early error above the bound."""

from __future__ import annotations

import pytest
import torch

from s2dit_deploy.cli import _error_record
from s2dit_deploy.errors import EXIT_INPUT, InputError
from s2dit_deploy.memory_budget import (BASE_BYTES, GIB, TARGET_FACTORS, MemoryBudgetError,
                                        check_memory_budget, estimate_compile_memory, pieces_needed)
from s2dit_deploy.model_zoo.registry import get_card
from s2dit_deploy.model_zoo.stats import stage_params

ALL = ("text_encoder", "dit_step", "decoder")
MOBILE = get_card("s2dit-mobile").config
TINY = get_card("s2dit-tiny").config


@pytest.fixture(scope="module")
def mobile_params():
    return stage_params(MOBILE)


def test_a_tiny_bound_gives_the_clear_error():
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(TINY, "coreml", ALL, {}, torch.float32, bound_bytes=GIB // 2, available=64 * GIB)
    exc = info.value
    msg = str(exc)
    est = exc.payload["memory_estimate"]
    assert isinstance(exc, InputError) and exc.exit_code == EXIT_INPUT
    assert f"needs an estimated {est['peak'] / GIB:.1f} GiB" in msg and "bound of 0.5 GiB" in msg
    assert "the bound set for this compile" in msg and "To fit:" in msg and "fewer stages" in msg
    code, record = _error_record(exc)  # the CLI's --json error carries the numbers too
    assert code == EXIT_INPUT and record["memory_estimate"]["bound"] == GIB // 2


def test_the_lower_available_memory_is_the_bound(mobile_params):
    est = check_memory_budget(MOBILE, "coreml", ("dit_step",), {}, torch.float16, available=64 * GIB,
                              params=mobile_params)
    assert est["bound"] == 20 * GIB and est["peak"] < est["bound"]
    with pytest.raises(MemoryBudgetError, match=r"bound of 6\.0 GiB \(the machine's available memory"):
        check_memory_budget(MOBILE, "coreml", ("dit_step",), {}, torch.float16, available=6 * GIB,
                            params=mobile_params)


def test_estimate_reproduces_the_measured_coreml_point(mobile_params):
    """Core ML compile of the s2dit-mobile DiT from an fp16 checkpoint (whole pipeline loaded):
    11.5 GiB RSS measured while converting."""
    est = estimate_compile_memory(MOBILE, "coreml", ("dit_step",), None, torch.float16, mobile_params)
    assert 11.0 * GIB <= est["peak"] <= 12.0 * GIB
    assert "measured" in TARGET_FACTORS["coreml"].source


def test_fp16_weights_and_pieces_shrink_the_estimate(mobile_params):
    f32 = estimate_compile_memory(MOBILE, "coreml", ALL, {}, torch.float32, mobile_params)["stages"]["dit_step"]
    f16 = estimate_compile_memory(MOBILE, "coreml", ALL, {}, torch.float16, mobile_params)["stages"]["dit_step"]
    assert f16["resident_weights"] * 2 == f32["resident_weights"] and f16["working"] == f32["working"]
    q32 = estimate_compile_memory(MOBILE, "executorch-qnn", ALL, {}, torch.float32, mobile_params)["stages"]
    four = estimate_compile_memory(MOBILE, "executorch-qnn", ALL, {"shards": "4"}, torch.float32, mobile_params)
    assert four["stages"]["dit_step"]["pieces"] == 4
    assert abs(four["stages"]["dit_step"]["working"] * 4 - q32["dit_step"]["working"]) <= 4
    qnn = estimate_compile_memory(MOBILE, "executorch-qnn", ALL, {"shards": 8}, torch.float16, mobile_params)
    assert qnn["stages"]["dit_step"]["pieces"] == 8 and qnn["stages"]["text_encoder"]["base"] == BASE_BYTES
    # a split option the target does not have changes nothing
    onnx = estimate_compile_memory(MOBILE, "onnx", ALL, {"chunks": 4}, torch.float16, mobile_params)
    assert onnx["stages"]["dit_step"]["pieces"] == 1


def test_the_advice_names_a_split_that_fits(mobile_params):
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(MOBILE, "executorch-qnn", ("dit_step",), {}, torch.float16, bound_bytes=12 * GIB,
                            available=64 * GIB, params=mobile_params)
    n = pieces_needed(MOBILE, "executorch-qnn", "dit_step", 12 * GIB, torch.float16, mobile_params)
    assert n is not None and n > 1
    msg = str(info.value)
    hint = next(int(part.split("=")[1].split(";")[0]) for part in msg.split() if part.startswith("shards="))
    assert hint >= n  # the advised count (powers of two) fits
    fits = check_memory_budget(MOBILE, "executorch-qnn", ("dit_step",), {"shards": hint}, torch.float16,
                               bound_bytes=12 * GIB, available=64 * GIB, params=mobile_params)
    assert fits["peak"] <= 12 * GIB
    assert "fp16" not in msg.split("To fit:")[1]  # already fp16: not advised again


@pytest.mark.parametrize("options, field", [({"shards": "-1"}, "shards"), ({"shards": "many"}, "shards")])
def test_bad_inputs_name_the_field(options, field):
    with pytest.raises(InputError, match=f"--option {field}="):
        estimate_compile_memory(TINY, "executorch-qnn", ALL, options, torch.float32)
    unknown = estimate_compile_memory(TINY, "tpu", ALL)  # e.g. a test's target: the most conservative factor
    assert "no factor" in unknown["factor"]["source"]
    with pytest.raises(InputError, match="unknown stages"):
        estimate_compile_memory(TINY, "coreml", ("dit",))
    with pytest.raises(InputError, match="dtype"):
        estimate_compile_memory(TINY, "coreml", ALL, None, torch.int8)
