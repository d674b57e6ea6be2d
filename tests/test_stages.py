"""Deployment stage wrappers: flat I/O equals the float modules, contracts are consistent, export works."""

import pytest
import torch

import s2dit_deploy as sd
from s2dit_deploy.model_zoo.cache import push_entries
from s2dit_deploy.stages import build_stages, dit_step_inputs


@pytest.fixture(scope="module")
def pipe():
    return sd.load_pipeline("s2dit-tiny")


@pytest.fixture(scope="module")
def stages(pipe):
    return build_stages(pipe)


def test_contracts_match_example_inputs_and_outputs(stages):
    for stage in stages.values():
        assert [tuple(t.shape) for t in stage.example_inputs] == [s.shape for s in stage.inputs]
        outs = stage.run_float(dict(zip(stage.input_names, stage.example_inputs)))
        assert [tuple(outs[n].shape) for n in stage.output_names] == [s.shape for s in stage.outputs]
        for i, o in stage.state_pairs:
            assert i in stage.input_names and o in stage.output_names


def test_dit_step_stage_equals_model_step_with_host_rope(pipe, stages):
    stage, cfg = stages["dit_step"], pipe.config
    cache = pipe.dit.init_cache(1, cfg.latent_hw, cfg.stream)
    x, ctx = torch.randn(1, *cfg.chunk_latent_shape), torch.randn(1, 77, cfg.dit.text_dim)
    with torch.no_grad():
        for chunk in range(3):  # fills the window; frame offsets 0, 3, 6
            named = dit_step_inputs(cfg, x + chunk, 0.7, ctx, cache, 3 * chunk)
            out = stage.run_float(named)
            v, entries = pipe.dit.step(x + chunk, 0.7, ctx, cache, 3 * chunk)
            assert (out["velocity"] - v).abs().max() <= 1e-5
            cache = push_entries(cache, entries)
            assert all(torch.equal(out[f"entry.{k}"], e) for k, e in entries.items())


def test_decoder_stage_carries_its_cache(pipe, stages):
    stage = stages["decoder"]
    z = torch.randn(2, *pipe.config.chunk_latent_shape).unsqueeze(1).unbind(0)
    cache = pipe.decoder.init_cache(1, *pipe.config.latent_hw)
    named = {"z": z[0], **{f"cache.{i}": c for i, c in enumerate(cache)}}
    first = stage.run_float(named)
    named2 = {"z": z[1], **{i: first[o] for i, o in stage.state_pairs}}
    second = stage.run_float(named2)
    full, _ = pipe.decoder(torch.cat(z, dim=2))
    assert (torch.cat([first["video"], second["video"]], dim=2) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["dit_step", "decoder", "text_encoder"])
def test_stages_export_with_torch_export(stages, name):
    stage = stages[name]
    ep = torch.export.export(stage.module, stage.example_inputs)
    ref = stage.module(*stage.example_inputs)
    got = ep.module()(*stage.example_inputs)
    for a, b in zip(ref, got):
        assert (a - b).abs().max() <= 1e-5


def test_unknown_stage_is_a_clear_error(pipe):
    with pytest.raises(KeyError, match="unknown stages"):
        build_stages(pipe, ("dit",))


def test_record_inputs_captures_every_stage_call(pipe):
    from s2dit_deploy.fidelity import record_inputs

    calls = record_inputs(pipe, "a red circle", num_chunks=2, steps=2, seed=0)
    assert len(calls["text_encoder"]) == 1
    assert len(calls["dit_step"]) == 2 * (2 + 1)  # steps + the t=0 commit pass per chunk
    assert len(calls["decoder"]) == 2
    assert calls["dit_step"][-1]["cache.window_valid"].tolist() == [0.0, 1.0]
    assert float(calls["dit_step"][2]["t"]) == 0.0
