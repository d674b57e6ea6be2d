"""pytest-benchmark: LCHA vs full softmax attention, one layer's chunk step at 1x/2x/4x/8x tokens.

Not part of the test suite (testpaths = tests). Run:
    python -m pytest bench/test_bench_attention.py --benchmark-only -n 0 -p no:cacheprovider
For the 8x/1x ratios in one JSON table: python -m s2dit_deploy.bench.attention --model s2dit-small
"""

import os

import pytest
import torch

from s2dit_deploy.bench.attention import FACTORS, KINDS, attention_step

MODEL = os.environ.get("S2DIT_BENCH_MODEL", "s2dit-small")


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("kind", KINDS)
def test_attention_step(benchmark, kind, factor):
    torch.set_num_threads(int(os.environ.get("S2DIT_BENCH_THREADS", "1")))
    fn, info = attention_step(MODEL, kind, factor)
    benchmark.group = f"{MODEL} attention step"
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
