"""The DiT splitter: pieces chained in torch equal the unsplit stage exactly, weights are shared,
the plan is balanced and bad piece counts are refused with a message naming the limit."""

import pytest
import torch

from s2dit_deploy.model_zoo.pipeline import load_pipeline
from s2dit_deploy.rewrites.graph_split import (SplitError, group_weight_bytes, pieces_for_bound, plan_ranges,
                                               run_chain, split_graph, torch_piece_run)
from s2dit_deploy.stages import build_stages
from tests.coreml_helpers import random_inputs


@pytest.fixture(scope="module")
def stage():
    return build_stages(load_pipeline("s2dit-tiny"), ("dit_step",))["dit_step"]


@pytest.mark.parametrize("pieces", [2, 4])
def test_chain_equals_whole_stage(stage, pieces):
    named = random_inputs(stage)
    ref = stage.run_float(named)
    parts = split_graph(stage.module, stage.example_inputs, stage.input_names, stage.output_names, pieces)
    assert len(parts) == pieces and [p.groups for p in parts][0][0] == 0 and parts[-1].groups[1] == 4
    got = run_chain(parts, named, torch_piece_run, stage.output_names)
    for k, r in ref.items():
        assert torch.equal(r, got[k]), k
    # every cache entry comes from the piece that holds its group; no piece reads a later piece's tensor
    for p in parts:
        for name in p.output_names:
            if name.startswith("entry.groups."):
                assert p.groups[0] <= int(name.split(".")[2]) < p.groups[1], name


def test_pieces_share_weights(stage):
    parts = split_graph(stage.module, stage.example_inputs, stage.input_names, stage.output_names, 2)
    original = {t.data_ptr() for t in stage.module.parameters()}
    for p in parts:
        assert {t.data_ptr() for t in p.module.parameters()} <= original


def test_plan_is_balanced_and_contiguous():
    assert plan_ranges([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert plan_ranges([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert plan_ranges([1] * 14, 3) == [(0, 4), (4, 9), (9, 14)]
    ranges = plan_ranges([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert [a for a, _ in ranges][0] == 0 and ranges[-1][1] == 8
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("bad,match", [(0, "positive"), (5, "at most 4"), (True, "positive"), (1.5, "positive")])
def test_bad_piece_count_is_refused(stage, bad, match):
    with pytest.raises(SplitError, match=match):
        split_graph(stage.module, stage.example_inputs, stage.input_names, stage.output_names, bad)


def test_bound_picks_fewest_pieces(stage):
    groups, other = group_weight_bytes(stage.module)
    total = sum(groups) + other
    assert pieces_for_bound(stage.module, total) == 1
    n = pieces_for_bound(stage.module, max(groups) + other)
    assert 1 < n <= 4


def test_split_needs_groups():
    with pytest.raises(SplitError, match="no DiT groups"):
        group_weight_bytes(torch.nn.Linear(2, 2))
