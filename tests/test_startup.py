"""Startup stays cheap: heavy toolchains load only when a command needs them (issue 16, item 16).

Each check runs a fresh interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

HEAVY = ("transformers", "coremltools", "executorch", "onnxruntime", "torchao")
PROBE = ("import sys, json\n{code}\n"
         "sys.stderr.flush()\n"
         "print('\\n@@' + json.dumps(sorted(m for m in {mods!r} if m in sys.modules)))\n")


def run(code: str, mods: tuple[str, ...]) -> tuple[str, str, list[str]]:
    """stdout (before the probe line), stderr and which of ``mods`` ended up imported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(code=code, mods=mods)], capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, _, loaded = proc.stdout.rpartition("\n@@")
    return out, proc.stderr, json.loads(loaded)


def cli(*argv: str) -> str:
    return ("from s2dit_deploy.cli import main\n"
            f"sys.argv = ['s2dit-deploy', *{list(argv)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n")


def test_import_s2dit_deploy_loads_no_torch_and_no_toolchain():
    _, err, loaded = run("import s2dit_deploy", ("torch", *HEAVY))
    assert loaded == [] and err == ""


def test_help_loads_no_torch_and_no_toolchain():
    out, err, loaded = run(cli("--help"), ("torch", *HEAVY))
    assert "usage: s2dit-deploy" in out
    assert loaded == [] and err == ""


def test_models_no_flops_json_is_quiet_and_loads_no_toolchain():
    out, err, loaded = run(cli("models", "--no-flops", "--json"), HEAVY)
    assert loaded == [], f"`models --no-flops` imported {loaded}"
    assert err == "", f"`models --no-flops --json` wrote to stderr:\n{err}"
    rows = json.loads(out)
    assert {"s2dit-tiny", "s2dit-small"} <= {r["name"] for r in rows}


def test_lazy_api_resolves_and_rejects_unknown_names():
    import s2dit_deploy as sd

    assert callable(sd.list_models) and "list_models" in dir(sd)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sd.nope  # noqa: B018


def test_text_encoder_param_formula_matches_the_built_clip():
    """stage_params counts the CLIP stage by formula (no transformers import): it must be exact."""
    import torch

    from s2dit_deploy.model_zoo import stats
    from s2dit_deploy.model_zoo.registry import list_cards
    from s2dit_deploy.model_zoo.text_encoder import TextEncoder

    for card in list_cards():
        with torch.device("meta"):
            built = sum(p.numel() for p in TextEncoder(card.config.text_encoder).parameters())
        assert stats.stage_params(card.config)["text_encoder"] == built, card.name


def test_torchao_import_hides_only_the_unused_cuda_kernel_warnings():
    _, err, loaded = run("from s2dit_deploy.quant.torchao_compat import import_torchao\nimport_torchao()",
                         ("torchao",))
    assert loaded == ["torchao"]
    assert "Failed to load" not in err, err


@pytest.mark.parametrize("message, shown", [
    ("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library", False),
    ("Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load this library", False),
    ("Failed to load /x/torchao/_C.abi3.so: undefined symbol", True),  # a kernel we may need: kept
    ("Skipping import of cpp extensions due to incompatible torch version.", True),
])
def test_the_torchao_filter_keeps_failures_that_may_matter(message, shown):
    from s2dit_deploy.quant.torchao_compat import _DemoteUnused

    record = logging.LogRecord("torchao", logging.WARNING, __file__, 1, message, None, None)
    assert _DemoteUnused().filter(record) is shown
