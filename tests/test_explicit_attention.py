"""The written-out attention (multiplicative slot mask) equals the model's masked attention."""

import copy

import torch
from s2dit_deploy.fidelity import record_inputs
from s2dit_deploy.model_zoo.pipeline import load_pipeline
from s2dit_deploy.stages import build_stages
from s2dit_deploy.targets.explicit_attention import explicit_attention


def test_explicit_attention_equals_masked_attention_on_a_partly_filled_cache():
    torch.manual_seed(0)
    pipe = load_pipeline("s2dit-tiny")
    stage = build_stages(pipe, ("dit_step",))["dit_step"]
    calls = record_inputs(pipe, "a red ball", 2, pipe.config.steps, 0)["dit_step"]
    named = calls[len(calls) // 2 + 1]  # chunk 1: one chunk in the window, the other slots still empty
    assert 0 < float(named["cache.window_valid"].float().mean()) < 1
    module = copy.deepcopy(stage.module).eval()
    assert explicit_attention(module) > 0
    with torch.no_grad():
        ref = stage.module(*(named[n] for n in stage.input_names))
        got = module(*(named[n] for n in stage.input_names))
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
