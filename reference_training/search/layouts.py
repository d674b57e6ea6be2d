"""Layouts, their predicted cost, and the budget DP that picks one (supplement A, point iii).

A layout of M groups fixes m_1 = m_M = 1 (``L``) and has exactly k ``L`` among the n - 2 = M - 2
middle groups. Its cost (device latency or FLOPs of one DiT step) is exactly additive over its
runs of consecutive ``S`` groups: a run [a, b] replaces the L groups a..b by S groups and adds the
downsampler at a and the upsampler at b + 1, and nothing else changes. So

    cost(layout) = cost(all L) + sum over S runs [a, b] of (cost(run [a, b] alone) - cost(all L)),

and the (M-2)(M-1)/2 + 1 single-run layouts price all 2^(M-2) layouts. ``RunCosts`` holds those
prices; whoever measures them (``bench.layout_cost`` traces each one through the device cost
model) stays out of this module, which the training side imports.

The DP minimises an additive score (the routers' negative log-probabilities) subject to exactly k
L groups and cost <= budget, keeping a Pareto set of (cost, score) per state, so it is exact; the
brute force over all C(M-2, k) layouts checks it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ...errors import InputError


class LayoutBudgetError(InputError):
    """A budget no layout meets (or one every layout meets), or a k outside [0, M-2]."""


def check_k(groups: int, k: int) -> None:
    if groups < 2:
        raise LayoutBudgetError(f"a sandwich search needs at least 2 groups (m_1 = m_M = 1), got {groups}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= groups - 2:
        raise LayoutBudgetError(f"k (LCHA groups among the {groups - 2} middle groups) must be in [0, {groups - 2}], got {k!r}")


def layouts_with_k(groups: int, k: int) -> Iterator[str]:
    """Every layout with L at both ends and exactly k L among the middle groups (C(M-2, k) of them)."""
    check_k(groups, k)
    for chosen in itertools.combinations(range(groups - 2), k):
        mid = ["L" if i in chosen else "S" for i in range(groups - 2)]
        yield "L" + "".join(mid) + "L"


def s_runs(layout: str) -> list[tuple[int, int]]:
    """Maximal runs [a, b] (group indices, inclusive) of S groups."""
    runs, start = [], None
    for i, c in enumerate(layout + "L"):
        if c == "S" and start is None:
            start = i
        elif c != "S" and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def single_run_layouts(groups: int) -> dict[tuple[int, int], str]:
    """The layouts that price every other: one S run [a, b] inside the middle groups."""
    return {(a, b): "L" * a + "S" * (b - a + 1) + "L" * (groups - 1 - b)
            for a in range(1, groups - 1) for b in range(a, groups - 1)}


@dataclass(frozen=True)
class RunCosts:
    """Cost of the all-L layout and of each single-run layout, in ``unit`` (ms or GFLOP)."""

    groups: int
    all_l: float
    runs: dict[tuple[int, int], float]
    unit: str = "ms"
    source: str = ""

    def __post_init__(self) -> None:
        missing = set(single_run_layouts(self.groups)) - set(self.runs)
        if missing:
            raise ValueError(f"run costs miss runs {sorted(missing)[:4]}")

    def run_delta(self, a: int, b: int) -> float:
        return self.runs[(a, b)] - self.all_l

    def cost(self, layout: str) -> float:
        if len(layout) != self.groups:
            raise ValueError(f"layout {layout!r} has {len(layout)} groups; the costs are for {self.groups}")
        return self.all_l + sum(self.run_delta(a, b) for a, b in s_runs(layout))

    @classmethod
    def measure(cls, groups: int, price: Callable[[str], float], unit: str, source: str = "") -> "RunCosts":
        layouts = single_run_layouts(groups)
        return cls(groups, price("L" * groups), {r: price(lay) for r, lay in layouts.items()}, unit, source)

    def bounds(self, k: int | None = None) -> tuple[float, float]:
        """(cheapest, most expensive) cost over the layouts with k middle L groups (any k if None)."""
        ks = range(self.groups - 1) if k is None else (k,)
        costs = [self.cost(lay) for kk in ks for lay in layouts_with_k(self.groups, kk)]
        return min(costs), max(costs)

    def cheapest(self) -> str:
        return min((self.cost(lay), lay) for kk in range(self.groups - 1) for lay in layouts_with_k(self.groups, kk))[1]

    def to_dict(self) -> dict:
        return {"groups": self.groups, "all_l": self.all_l, "unit": self.unit, "source": self.source,
                "runs": {f"{a}-{b}": v for (a, b), v in self.runs.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "RunCosts":
        runs = {tuple(int(x) for x in key.split("-")): float(v) for key, v in d["runs"].items()}
        return cls(int(d["groups"]), float(d["all_l"]), runs, d.get("unit", "ms"), d.get("source", ""))


def router_scores(score_l: Sequence[float]) -> tuple[list[float], list[float]]:
    """Additive DP scores of the middle groups from the routers' L-vs-S logit differences:
    -log p(L) and -log p(S) per group (a sigmoid of the difference)."""
    neg_l = [math.log1p(math.exp(-s)) if s > -30 else -s for s in score_l]
    neg_s = [math.log1p(math.exp(s)) if s < 30 else s for s in score_l]
    return neg_l, neg_s


def layout_score(layout: str, neg_l: Sequence[float], neg_s: Sequence[float]) -> float:
    mid = layout[1:-1]
    return sum(neg_l[i] if c == "L" else neg_s[i] for i, c in enumerate(mid))


def check_budget(costs: RunCosts, budget: float, k: int | None = None) -> None:
    """A budget must lie between the cheapest and the most expensive layout (else it is a unit slip
    or a wish); with k given, it must also admit one of that k's layouts."""
    low, high = costs.bounds()
    span = f"layouts cost {low:.4g} (cheapest, {costs.cheapest()}) to {high:.4g} (most expensive, {'L' * costs.groups}) {costs.unit}"
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < low:
        raise LayoutBudgetError(f"budget {budget!r} {costs.unit} is below the cheapest layout; {span}")
    if budget > high * (1 + 1e-9):
        raise LayoutBudgetError(f"budget {budget:g} {costs.unit} is above the most expensive layout, so it "
                                f"constrains nothing; {span}")
    if k is not None:
        k_low, k_high = costs.bounds(k)
        if budget < k_low:
            raise LayoutBudgetError(f"budget {budget:g} {costs.unit} is below every layout with k={k} "
                                    f"({k_low:.4g} to {k_high:.4g} {costs.unit}); lower k or raise the budget")


def k_for_budget(costs: RunCosts, budget: float) -> int:
    """The most LCHA groups whose cheapest layout fits the budget (high resolution where affordable)."""
    check_budget(costs, budget)
    return max(k for k in range(costs.groups - 1) if costs.bounds(k)[0] <= budget + 1e-12)


def dp_layout(costs: RunCosts, k: int, budget: float, neg_l: Sequence[float], neg_s: Sequence[float]
              ) -> tuple[str, float, float]:
    """(layout, cost, score) minimising the score with exactly k middle L groups and cost <= budget."""
    check_k(costs.groups, k)
    check_budget(costs, budget, k)
    m = costs.groups
    # state: position i of the next undecided middle group (1..m-1; m-1 = the fixed last L) and the
    # number of L chosen so far; value: Pareto list of (cost, score, layout suffix so far)
    frontier: dict[tuple[int, int], list[tuple[float, float, str]]] = {(1, 0): [(costs.all_l, 0.0, "L")]}
    for i in range(1, m - 1):
        for used in range(0, k + 1):
            here = frontier.pop((i, used), [])
            for c, s, lay in here:
                if used < k:  # group i is L
                    _push(frontier, (i + 1, used + 1), (c, s + neg_l[i - 1], lay + "L"))
                for b in range(i, m - 1):  # an S run [i, b], then an L at b + 1 (or the fixed end)
                    run_s = sum(neg_s[j - 1] for j in range(i, b + 1))
                    nxt = (c + costs.run_delta(i, b), s + run_s, lay + "S" * (b - i + 1))
                    if b + 1 == m - 1:
                        _push(frontier, (m - 1, used), nxt)
                    elif used < k:
                        _push(frontier, (b + 2, used + 1), (nxt[0], nxt[1] + neg_l[b], nxt[2] + "L"))
    final = [(c, s, lay + "L") for c, s, lay in frontier.get((m - 1, k), []) if c <= budget + 1e-12]
    if not final:  # check_budget passed, so this is a bug
        raise AssertionError("DP found no layout under a budget the bounds allow")
    c, s, lay = min(final, key=lambda x: (x[1], x[0], x[2]))
    return lay, c, s


def _push(frontier, key, item) -> None:
    """Insert keeping only (cost, score) pairs not dominated by another."""
    items = frontier.setdefault(key, [])
    c, s, _ = item
    if any(c2 <= c and s2 <= s for c2, s2, _ in items):
        return
    items[:] = [x for x in items if not (c <= x[0] and s <= x[1])] + [item]


def brute_force_layout(costs: RunCosts, k: int, budget: float, neg_l: Sequence[float], neg_s: Sequence[float]
                       ) -> tuple[str, float, float]:
    """The same choice by enumerating all C(M-2, k) layouts (the DP's test oracle)."""
    check_budget(costs, budget, k)
    best = min((layout_score(lay, neg_l, neg_s), costs.cost(lay), lay) for lay in layouts_with_k(costs.groups, k)
               if costs.cost(lay) <= budget + 1e-12)
    return best[2], best[1], best[0]
