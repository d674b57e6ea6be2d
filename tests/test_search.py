"""Sandwich search: the budget DP against brute force, exact layout costs, fixed-k routers, parameter
inheritance, the fixed-layout export, a short real search run and its bad-input errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest
import torch

from s2dit_deploy.model_zoo.checkpoint import read_config, save_checkpoint
from s2dit_deploy.model_zoo.dit import S2DiT
from s2dit_deploy.model_zoo.registry import get_card, load_stage
from s2dit_deploy.reference_training.search.inherit import (TeacherMismatchError, check_teacher, fixed_layout_model,
                                                            routed_student)
from s2dit_deploy.reference_training.search.layouts import (LayoutBudgetError, RunCosts, brute_force_layout,
                                                            dp_layout, layouts_with_k, router_scores,
                                                            single_run_layouts)
from s2dit_deploy.reference_training.search.routers import sample_fixed_k

from .conftest import tiny_dit_config


def random_costs(groups: int, seed: int) -> RunCosts:
    rng = random.Random(seed)
    return RunCosts(groups, 10.0, {r: 10.0 - rng.uniform(0.2, 3.0) * (r[1] - r[0] + 1) + rng.uniform(0, 0.8)
                                   for r in single_run_layouts(groups)})


@pytest.mark.parametrize("groups", [5, 7, 8])
def test_dp_equals_brute_force_over_every_layout(groups):
    for seed in range(6):
        costs = random_costs(groups, seed)
        rng = random.Random(100 + seed)
        neg_l, neg_s = router_scores([rng.gauss(0, 2) for _ in range(groups - 2)])
        for k in range(groups - 1):
            low, high = costs.bounds(k)
            for budget in (low, 0.5 * (low + high), high):
                budget = min(budget, costs.bounds()[1])
                lay, cost, score = dp_layout(costs, k, budget, neg_l, neg_s)
                b_lay, b_cost, b_score = brute_force_layout(costs, k, budget, neg_l, neg_s)
                assert (lay, cost, score) == (b_lay, pytest.approx(b_cost), pytest.approx(b_score))
                assert lay[0] == lay[-1] == "L" and lay[1:-1].count("L") == k and cost <= budget + 1e-9


def test_layout_count_is_the_binomial():
    assert sum(1 for _ in layouts_with_k(8, 3)) == 20  # C(6, 3)
    assert len(single_run_layouts(6)) == 10


@pytest.mark.parametrize("device", [None, "iphone-16-pro-max"])
def test_run_decomposition_prices_every_layout_exactly(device):
    """Cost = all-L + sum of each S run's own delta, checked against tracing every layout."""
    from s2dit_deploy.bench.layout_cost import layout_pricer

    card = get_card("s2dit-tiny").config
    config = dataclasses.replace(card, dit=dataclasses.replace(card.dit, layout="LLLLLL"))
    price, unit, _ = layout_pricer(config, device, "w8a8")
    costs = RunCosts.measure(6, price, unit)
    for mid in itertools.product("LS", repeat=4):
        layout = "L" + "".join(mid) + "L"
        assert costs.cost(layout) == pytest.approx(price(layout), rel=1e-9, abs=1e-12)
    assert costs.cost("LSSSSL") < costs.cost("LLLLLL")  # SSA at the strided grid is cheaper


def test_fixed_k_routers_keep_the_ends_and_exactly_k():
    logits = torch.randn(6, 2, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = sample_fixed_k(logits, 2, 0.5, g)
        assert m[0] == 1 and m[-1] == 1 and int(m[1:-1].round().sum()) == 2
    m = sample_fixed_k(logits, 2, 0.5, g)
    (m * torch.arange(6.0)).sum().backward()
    assert logits.grad is not None and logits.grad[1:-1].abs().sum() > 0  # STE reaches the scores
    assert logits.grad[[0, -1]].abs().sum() == 0  # m_1 = m_M = 1 are constants


def _teacher(groups: int = 6) -> S2DiT:
    torch.manual_seed(0)
    return S2DiT(tiny_dit_config("F" * groups)).eval()


def test_inheritance_copies_every_shared_tensor_exactly():
    teacher = _teacher()
    student, report = routed_student(teacher)
    t = teacher.state_dict()
    s = student.state_dict()
    for name, value in s.items():
        src = name.replace(".low.", ".high.")
        if ".attn.local." in name:
            assert value.abs().sum() == 0  # the LCHA conv starts at zero
        elif src in t:
            assert torch.equal(value, t[src]), name
    assert report["copied_params"] > 0.8 * sum(v.numel() for v in s.values())
    assert all(".local." in n or "ups." in n or "downs." in n or "routers" in n for n in report["new"])


def test_fixed_layout_model_equals_the_routed_model_with_constant_routers():
    student, _ = routed_student(_teacher())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # trained-looking: samplers and local convs not at init
    x, ctx = torch.randn(1, 16, 6, 8, 12), torch.randn(1, 5, 16)
    t = torch.rand(1, 6)
    for layout in ("LSSLSL", "LLSSLL", "LSSSSL"):
        fixed = fixed_layout_model(student, layout)
        m = torch.tensor([0.0 if c == "S" else 1.0 for c in layout])
        with torch.no_grad():
            ref = student(x, t, ctx, 3, 2, routers=m)
            out = fixed(x, t, ctx, 3, 2)
        assert (ref - out).abs().max() <= 1e-5, layout
        assert sum(p.numel() for p in fixed.parameters()) < sum(p.numel() for p in student.parameters())


def test_bad_k_budget_and_teacher_are_rejected():
    costs = random_costs(6, 0)
    neg_l, neg_s = router_scores([0.0] * 4)
    with pytest.raises(LayoutBudgetError, match=r"k .* must be in \[0, 4\]"):
        dp_layout(costs, 5, 9.0, neg_l, neg_s)
    low, high = costs.bounds()
    with pytest.raises(LayoutBudgetError, match="below the cheapest.*cheapest.*most expensive"):
        dp_layout(costs, 2, low - 1, neg_l, neg_s)
    with pytest.raises(LayoutBudgetError, match="above the most expensive.*cheapest.*most expensive"):
        dp_layout(costs, 2, high + 1, neg_l, neg_s)
    with pytest.raises(TeacherMismatchError, match="all self-attention"):
        check_teacher(tiny_dit_config("LSSL"))
    with pytest.raises(TeacherMismatchError, match="4 groups, the search space has 6"):
        check_teacher(tiny_dit_config("FFFF"), 6)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A dense (FFFFFF) s2dit-tiny checkpoint: random weights, laid out like a trained one."""
    folder = tmp_path_factory.mktemp("teacher")
    card = get_card("s2dit-tiny").config
    cfg = dataclasses.replace(card, dit=dataclasses.replace(card.dit, layout="FFFFFF"), height=32, width=64)
    mods = {s: load_stage(cfg, None, s) for s in ("text_encoder", "dit", "decoder")}
    return save_checkpoint(folder / "model", cfg, mods)


def test_search_run_moves_routers_and_exports_a_fixed_layout(tiny_teacher, tmp_path):
    from s2dit_deploy.cli import main

    out = tmp_path / "search"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"count": 8, "heldout_count": 4, "batch_size": 2, "eval_batches": 1,
                               "router_lr": 0.5, "checkpoint_every": 3}))
    argv = ["search", "--teacher", str(tiny_teacher), "--out", str(out), "--flops", "--k", "2",
            "--resolution", "32x64", "--steps", "4", "--config", str(cfg), "--json"]
    assert main(argv) == 0
    result = json.loads((out / "result" / "search.json").read_text())
    layout = result["layout"]
    assert layout[0] == layout[-1] == "L" and layout[1:-1].count("L") == 2
    assert result["router_scores"] != result["router_scores_start"]  # training moved the routers
    assert len(result["evaluated"]) == 16 and result["plot"] and (out / "pareto.png").stat().st_size > 1000
    searched = load_stage(read_config(out / "model"), out / "model", "dit")
    assert searched.cfg.layout == layout and not searched.cfg.search
    # the run resumes from its training state instead of starting over
    assert main(argv) == 0
    assert json.loads((out / "result" / "search.json").read_text())["start"] == 4


def test_search_cli_names_both_bounds_of_a_bad_budget(tiny_teacher, tmp_path, capsys):
    from s2dit_deploy.cli import main

    code = main(["search", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"), "--flops",
                 "--budget", "1e9", "--resolution", "32x64", "--json"])
    err = json.loads(capsys.readouterr().out)
    assert code == 2 and err["error"] == "usage"
    assert "above the most expensive" in err["message"] and "cheapest" in err["message"]
    assert not (tmp_path / "s").exists()  # rejected before any work
