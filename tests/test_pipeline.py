"""The streaming pipeline end to end on the tiny model: shapes, determinism, chunk streaming."""

import numpy as np
import pytest
import torch

import s2dit_deploy as sd


@pytest.fixture(scope="module")
def pipe():
    return sd.load_pipeline("s2dit-tiny")


def test_generate_shapes_and_dtype(pipe):
    video = pipe.generate("a red ball bouncing", num_chunks=2, steps=2, seed=0)
    assert video.shape == (24, 64, 128, 3) and video.dtype == np.uint8


def test_same_seed_same_video_different_seed_differs(pipe):
    a = pipe.generate("a blue square", num_chunks=1, steps=1, seed=1)
    b = pipe.generate("a blue square", num_chunks=1, steps=1, seed=1)
    c = pipe.generate("a blue square", num_chunks=1, steps=1, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_prompt_conditions_the_output(pipe):
    a = pipe.generate("a red ball", num_chunks=1, steps=1, seed=0)
    b = pipe.generate("a green triangle spinning", num_chunks=1, steps=1, seed=0)
    assert not np.array_equal(a, b)


def test_stream_yields_one_chunk_at_a_time_and_carries_caches(pipe):
    chunks = list(pipe.stream("digits moving left", num_chunks=3, steps=1, seed=0))
    assert [c.shape[0] for c in chunks] == [12, 12, 12]
    whole = pipe.generate("digits moving left", num_chunks=3, steps=1, seed=0)
    assert np.array_equal(np.concatenate(chunks), whole)


def test_commit_pass_fills_the_window(pipe):
    state = pipe.start()
    ctx = pipe.encode_prompt("x")
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        noise = torch.randn((1, *pipe.config.chunk_latent_shape), generator=gen)
        pipe.denoise_chunk(noise, ctx, state, sd.model_zoo.sampler.FewStepSchedule(1), gen)
    assert state.frame_offset == 9
    assert state.dit_cache["window_valid"].tolist() == [1.0, 1.0]


def test_resolution_override_and_bad_resolution():
    p = sd.load_pipeline("s2dit-tiny", height=32, width=64)
    assert p.generate("x", num_chunks=1, steps=1).shape == (12, 32, 64, 3)
    with pytest.raises(ValueError, match="divisible"):
        sd.load_pipeline("s2dit-tiny", height=40, width=64)
    with pytest.raises(ValueError, match="num_chunks"):
        p.generate("x", num_chunks=0)
