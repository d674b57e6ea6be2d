"""Algorithm 1 routing: static layouts vs a hand-unrolled reference, vs the literal search-mode
recurrence with hard routers, and an all-LCHA layout vs a plain block stack."""

import pytest
import torch

from s2dit_deploy.model_zoo.dit import S2DiT

from .conftest import tiny_dit_config


def _inputs(model, frames=3, h=8, w=8):
    x = torch.randn(1, 16, frames, h, w)
    y, grid = model.embed(x)
    _, e = model.time(torch.rand(1), 1, grid[0], y.dtype)
    hi, lo = model.resolutions(grid)
    ctx = model.text_embedding(torch.randn(1, 5, 16))
    return y, e, ctx, hi, lo


def _stack(blocks, x, e, ctx, res):
    for blk in blocks:
        x = blk(x, e, ctx, res, None, None)
    return x


def unrolled_reference(model, layout, y, e, ctx, hi, lo):
    """Algorithm 1 unrolled by hand for each layout in the test (no loop over routers)."""
    g, up, down = model.sandwich.groups, model.sandwich.ups, model.sandwich.downs
    L = lambda n, x: _stack(g[n]["high"], x, e, ctx, hi)  # noqa: E731
    S = lambda n, x: _stack(g[n]["low"], x, e, ctx, lo)  # noqa: E731
    if layout == "LSSL":
        y1 = L(0, y)
        skip = y1
        ys = S(2, S(1, down["1"](y1, hi.grid)))
        return L(3, up["3"](ys, lo.grid) + skip)
    if layout == "LSLSL":
        y1 = L(0, y)
        ys = S(1, down["1"](y1, hi.grid))
        y3 = L(2, up["2"](ys, lo.grid) + y1)
        ys = S(3, down["3"](y3, hi.grid))
        return L(4, up["4"](ys, lo.grid) + y3)
    if layout == "LLSSSL":
        y2 = L(1, L(0, y))
        ys = S(4, S(3, S(2, down["2"](y2, hi.grid))))
        return L(5, up["5"](ys, lo.grid) + y2)
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["LSSL", "LSLSL", "LLSSSL"])
def test_static_layout_equals_hand_unrolled(layout):
    model = S2DiT(tiny_dit_config(layout)).eval()
    args = _inputs(model)
    with torch.no_grad():
        out = model.sandwich(*args)
        ref = unrolled_reference(model, layout, *args)
    assert out.shape == args[0].shape
    assert (out - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("layout", ["LSSL", "LSLSL", "LLSSSL"])
def test_search_recurrence_with_hard_routers_equals_static(layout):
    search = S2DiT(tiny_dit_config(layout, search=True)).eval()
    static = S2DiT(tiny_dit_config(layout)).eval()
    missing, unexpected = static.load_state_dict(search.state_dict(), strict=False)
    assert not missing  # a static model is a sub-network of the search supernet
    assert unexpected
    args = _inputs(static)
    m = torch.tensor([1.0 if c == "L" else 0.0 for c in layout])
    with torch.no_grad():
        assert (search.sandwich(*args, routers=m) - static.sandwich(*args)).abs().max() <= 1e-5


def test_all_lcha_layout_is_a_plain_stack():
    model = S2DiT(tiny_dit_config("LLLL")).eval()
    assert not model.sandwich.ups and not model.sandwich.downs
    y, e, ctx, hi, lo = _inputs(model)
    blocks = [blk for g in model.sandwich.groups for blk in g["high"]]
    assert len(blocks) == 8 and all(b.kind == "L" for b in blocks)
    with torch.no_grad():
        assert torch.equal(model.sandwich(y, e, ctx, hi, lo), _stack(blocks, y, e, ctx, hi))


def test_static_model_instantiates_only_active_modules():
    model = S2DiT(tiny_dit_config("LSSL"))
    kinds = [sorted(g.keys()) for g in model.sandwich.groups]
    assert kinds == [["high"], ["low"], ["low"], ["high"]]
    assert sorted(model.sandwich.downs) == ["1"] and sorted(model.sandwich.ups) == ["3"]


def test_search_routers_fix_first_and_last_and_pass_gradients():
    model = S2DiT(tiny_dit_config("LSSL", search=True)).train()
    m = model.sandwich.routers(tau=1.0)
    assert m[0] == 1 and m[-1] == 1 and set(m.tolist()) <= {0.0, 1.0}
    y, e, ctx, hi, lo = _inputs(model)
    model.sandwich(y, e, ctx, hi, lo).square().mean().backward()
    assert model.sandwich.routers.logits.grad is not None
    assert model.sandwich.routers.logits.grad[1:-1].abs().sum() > 0
    assert model.sandwich.routers.layout()[0] == "L"


def test_up_and_down_samplers_start_as_nearest_and_average():
    model = S2DiT(tiny_dit_config("LSSL"))
    y = torch.randn(1, 2 * 4 * 4, 32)
    lo_grid, hi_grid = (2, 2, 2), (2, 4, 4)
    low = model.sandwich.downs["1"](y, hi_grid)
    ref = y.view(1, 2, 2, 2, 2, 2, 32).mean(dim=(3, 5)).reshape(1, 8, 32)
    assert torch.allclose(low, ref, atol=1e-6)
    up = model.sandwich.ups["3"](low, lo_grid)
    assert torch.allclose(up.view(1, 2, 4, 4, 32)[:, :, ::2, ::2].reshape(1, 8, 32), low, atol=1e-6)
