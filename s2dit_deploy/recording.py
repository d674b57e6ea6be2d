"""Record the named inputs of every stage call in a float streaming run.

Calibration (quant, targets), validation and bench all feed stages the same real inputs (the
prompt's tokens, every denoising step with its filled cache, every decoder call with its cache).
The recorder sits in the shared core so none of them imports another to get it.
"""

from __future__ import annotations

import torch

from .model_zoo.pipeline import Pipeline
from .stages import dit_step_inputs


def record_inputs(pipe: Pipeline, prompt: str, num_chunks: int, steps: int, seed: int) -> dict[str, list]:
    """Named inputs of every stage call in a float streaming run."""
    from .model_zoo.tokenizer import tokenize

    calls: dict[str, list] = {"text_encoder": [], "dit_step": [], "decoder": []}
    ids = tokenize(prompt, pipe.config.text_encoder.max_position_embeddings).to(torch.int32)
    calls["text_encoder"].append({"input_ids": ids})
    dit, dec = pipe.dit, pipe.decoder
    cfg = pipe.config

    class DiTSpy:
        def step(self, x, t, context, cache, frame_offset=0):
            calls["dit_step"].append(dit_step_inputs(cfg, x, t, context, cache, int(frame_offset)))
            return dit.step(x, t, context, cache, frame_offset)

        init_cache, push_cache = dit.init_cache, staticmethod(dit.push_cache)

    class DecSpy:
        def __call__(self, z, cache):
            calls["decoder"].append({"z": z, **{f"cache.{i}": c for i, c in enumerate(cache)}})
            return dec(z, cache)

        init_cache = dec.init_cache

    spy = Pipeline(cfg, pipe.text_encoder, DiTSpy(), DecSpy())
    spy.generate(prompt, num_chunks=num_chunks, steps=steps, seed=seed)
    return calls
