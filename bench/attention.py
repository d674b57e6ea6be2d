"""LCHA vs full softmax attention as the tokens of a chunk grow (eager torch, one layer's ``step``).

The unit is one streaming chunk step of a single attention layer with a full cache window, the
way the deployed ``dit_step`` runs it: LCHA (``L``) reads its per-chunk linear-attention states
(d x d per head, independent of the token count) and the causal depthwise conv tail; dense
attention (``F`` in the layout, ``model_zoo.stats.with_full_attention``) attends over the cached
K/V of ``window`` chunks plus the current one, so its cost grows with tokens squared.
Tokens grow by enlarging the latent grid of the model's chunk (1x, 2x, 4x, 8x tokens).

    python -m s2dit_deploy.bench.attention --model s2dit-small    # prints the JSON table
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import torch

from .harness import time_interleaved

FACTORS = (1, 2, 4, 8)
KINDS = ("lcha", "full")


def scaled_grid(grid: tuple[int, int, int], factor: int) -> tuple[int, int, int]:
    """Double height, then width, alternately, until tokens are ``factor`` times the chunk's."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor must be a power of two, got {factor}")
    t, h, w = grid
    step = 0
    while factor > 1:
        if step % 2 == 0:
            h *= 2
        else:
            w *= 2
        factor //= 2
        step += 1
    return t, h, w


def attention_step(model: str, kind: str, factor: int, seed: int = 0) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A no-arg callable running one attention layer's chunk step, and facts about the case."""
    from s2dit_deploy.model_zoo.linear_attention import LinConvHybridAttention
    from s2dit_deploy.model_zoo.registry import get_card
    from s2dit_deploy.model_zoo.rope import rope_cos_sin
    from s2dit_deploy.model_zoo.softmax_attention import SelfAttention
    from s2dit_deploy.model_zoo.stats import with_full_attention

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = get_card(model).config
    if kind == "full":
        config = with_full_attention(config)
    d = config.dit
    window = config.stream.window_chunks
    base = d.token_grid(config.stream.chunk_frames, *config.latent_hw)
    grid = scaled_grid(base, factor)
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = (LinConvHybridAttention(d) if kind == "lcha" else SelfAttention(d)).eval()
    x = torch.randn(1, n, d.dim, generator=gen)
    rope = rope_cos_sin(grid, d.head_dim, d.rope_theta, 0)
    shapes = layer.cache_shapes(1, grid, window)
    cache = {k: 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    if kind == "lcha":
        cache["kv"] = cache["kv"].abs()
        cache["ksum"] = cache["ksum"].abs() + 1.0

        def fn():
            with torch.no_grad():
                return layer.step(x, grid, rope, cache)
    else:
        key_mask = torch.zeros(window * n)  # every slot of the window is filled

        def fn():
            with torch.no_grad():
                return layer.step(x, grid, rope, cache, key_mask)
    info = {"model": model, "kind": kind, "factor": factor, "grid": list(grid), "tokens": n,
            "keys": n if kind == "lcha" else (window + 1) * n, "dim": d.dim, "heads": d.num_heads}
    return fn, info


def scaling_table(model: str = "s2dit-small", factors=FACTORS, repeats: int = 5, warmup: int = 1,
                  threads: int | None = None) -> dict[str, Any]:
    """Median ms per step for each kind and factor, and time(max factor) / time(1x)."""
    if threads:
        torch.set_num_threads(threads)
    cases = {(kind, f): attention_step(model, kind, f) for kind in KINDS for f in factors}
    stats = time_interleaved({k: fn for k, (fn, _) in cases.items()}, repeats, warmup)
    rows = [{**info, **stats[k]} for k, (_, info) in cases.items()]
    ratios = {}
    for kind in KINDS:
        by = {r["factor"]: r["median_ms"] for r in rows if r["kind"] == kind}
        ratios[kind] = {f"{f}x_over_1x": round(by[f] / by[factors[0]], 2) for f in factors}
    return {"model": model, "torch_threads": torch.get_num_threads(), "rows": rows, "ratios": ratios,
            "unit": "ms per chunk step of one attention layer (eager torch, host CPU)"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="s2dit-small")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the whole table as JSON (default: a summary)")
    a = p.parse_args(argv)
    table = scaling_table(a.model, repeats=a.repeats, warmup=a.warmup, threads=a.threads)
    if a.json:
        sys.stdout.write(json.dumps(table, indent=2) + "\n")
        return
    lines = [f"{table['model']}: {table['unit']}, {table['torch_threads']} thread(s)"]
    for r in table["rows"]:
        lines.append(f"  {r['kind']:<8} {r['factor']}x  {r['tokens']:6d} tokens  {r['median_ms']:9.2f} ms")
    for kind, ratios in table["ratios"].items():
        lines.append(f"  {kind}: " + ", ".join(f"{k} = {v}" for k, v in ratios.items()))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
