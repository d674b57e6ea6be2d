"""pytest-benchmark: s2dit-small ``dit_step``, torch eager fp32 vs XNNPACK fp32 / int8 / 8da4w.

Not part of the test suite (testpaths = tests). Run:
    python -m pytest bench/test_bench_dit_step.py --benchmark-only -n 0 -p no:cacheprovider
The first run compiles three .pte files into build/bench-cache (minutes); later runs reuse them.
S2DIT_BENCH_MODEL picks another model (e.g. s2dit-tiny for a quick check); S2DIT_BENCH_RESOLUTION
another resolution (default 192x320, the s2dit-small card's deploy resolution: the bundled
checkpoint was trained at 64x32, where a chunk step has only 24 tokens).
"""

import os

import pytest

pytest.importorskip("executorch")

from s2dit_deploy.bench.dit_step import SCHEMES, dit_step_callables, set_threads  # noqa: E402

MODEL = os.environ.get("S2DIT_BENCH_MODEL", "s2dit-small")
RESOLUTION = tuple(int(v) for v in os.environ.get("S2DIT_BENCH_RESOLUTION", "192x320").split("x"))
CASES = ("eager-fp32", *(f"xnnpack-{s}" for s in SCHEMES))


@pytest.fixture(scope="module")
def callables():
    set_threads(int(os.environ.get("S2DIT_BENCH_THREADS", "1")))
    fns, info = dit_step_callables(MODEL, SCHEMES, resolution=RESOLUTION)
    return fns, info


@pytest.mark.parametrize("case", CASES)
def test_dit_step(benchmark, callables, case):
    fns, info = callables
    benchmark.group = f"{MODEL} dit_step"
    benchmark.extra_info.update({"model": MODEL, "resolution": list(RESOLUTION), "case": case, **info.get(case, {})})
    benchmark.pedantic(fns[case], rounds=10, iterations=1, warmup_rounds=2)
