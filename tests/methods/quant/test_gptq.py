"""GPTQ against an unblocked OBS reference written from the paper's equations, against plain
round-to-nearest, and the grids it shares with the export formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.collectors import InputStats, Stats
from export.formats.int4 import int4_blocks
from export.formats.int8 import int8_per_channel
from methods.quant import gptq as gptq_module
from methods.quant.gptq import gptq, output_error
from methods.quant.grid import Grid


def _inputs(seed: int, channels: int, tokens: int = 256) -> torch.Tensor:
    """Correlated activations with spread channel scales, [tokens, channels]."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(channels, generator=g))
    mix = torch.eye(channels) + 0.5 * torch.randn(channels, channels, generator=g) / channels ** 0.5
    return (torch.randn(tokens, channels, generator=g) * scales) @ mix


def _hessian(x: torch.Tensor) -> torch.Tensor:
    s = InputStats({"hessian"})
    s.update(x, None)
    return Stats(s.tensors()).hessian


def _weight(seed: int, n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _obs_reference(w: torch.Tensor, h: torch.Tensor, grid: Grid, dampening: float = 0.01,
                   order: torch.Tensor | None = None, static_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's equations, column by column in fp64: round column i, e = (w_i - q_i) / [H_F^-1]_ii,
    w_F -= e [H_F^-1]_i,F, where F = the columns not rounded yet and H_F^-1 is the inverse of the
    damped Hessian restricted to F, recomputed by explicit inversion at every step. Group scales are
    taken at a group's first column from the updated weights, unless ``static_scales`` are given."""
    k = w.shape[1]
    order = torch.arange(k) if order is None else order
    h = h.double() + dampening * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    w, h = w.double()[:, order].clone(), h[order][:, order]
    width = grid.width(k)
    scales = static_scales.double() if static_scales is not None else torch.zeros(w.shape[0], grid.groups(k))
    low, high = grid.levels
    q = torch.zeros_like(w)
    for i in range(k):
        g = int(order[i]) // width
        if static_scales is None and i % width == 0:
            scales[:, g] = (w[:, i:i + width].abs().amax(1) / high).clamp_min(1e-30)
        q[:, i] = torch.clamp(torch.round(w[:, i] / scales[:, g]), low, high) * scales[:, g]
        hinv = torch.linalg.inv(h[i:, i:])  # inverse Hessian of the columns not rounded yet
        e = (w[:, i] - q[:, i]) / hinv[0, 0]
        w[:, i:] -= torch.outer(e, hinv[0])
    return q[:, torch.argsort(order)]


def _rounded(w: torch.Tensor, *args, **kwargs):
    """GPTQ on a copy of ``w`` (it rounds in place): the rounded copy and the result."""
    q = w.clone()
    return q, gptq(q, *args, **kwargs)


@pytest.mark.parametrize("bits, group", [(4, 4), (4, 6), (4, None), (8, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_a_diagonal_hessian_gives_round_to_nearest(bits, group, act_order):
    """With uncorrelated inputs no column can compensate another: GPTQ is plain rounding."""
    w = _weight(0, 5, 16) * 3
    h = torch.diag(torch.rand(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1)
    q, out = _rounded(w, h.clone(), bits, group, act_order=act_order, blocksize=12 if group == 6 else 8)
    grid = Grid(bits, group)
    assert torch.equal(q, grid.nearest(w)) and torch.equal(out.scales, grid.scales(w))


@pytest.mark.parametrize("shape, group, blocksize", [
    ((3, 4), None, 1), ((3, 4), None, 2), ((2, 6), None, 4), ((2, 6), None, 128),
    ((4, 8), 2, 2), ((4, 8), 2, 4), ((3, 12), 4, 4), ((3, 12), 4, 8), ((3, 12), 4, 128)])
def test_blocked_cholesky_walk_equals_the_unblocked_obs_reference(shape, group, blocksize):
    n, k = shape
    w, h = _weight(2, n, k), _hessian(_inputs(3, k))
    grid = Grid(4, group)
    q, out = _rounded(w, h.clone(), 4, group, blocksize=blocksize)
    ref = _obs_reference(w, h, grid, static_scales=grid.scales(w) if group is None else None)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-5)
    assert not torch.equal(q, grid.nearest(w))  # the compensation changed some rounding


def test_act_order_walks_by_decreasing_hessian_diagonal_with_contiguous_static_groups():
    w, x = _weight(4, 4, 12), _inputs(5, 12)
    h = _hessian(x)
    grid = Grid(4, 4)
    q, out = _rounded(w, h.clone(), 4, 4, act_order=True, blocksize=5)  # any block size: the groups are fixed up front
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert not torch.equal(order, torch.arange(12))
    ref = _obs_reference(w, h, grid, order=order, static_scales=grid.scales(w))
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(out.scales, grid.scales(w))


@pytest.mark.parametrize("bits, group, act_order", [(4, 16, False), (4, 16, True), (4, 24, False), (8, None, False),
                                                    (8, None, True)])
def test_weights_lie_exactly_on_the_returned_grid_and_the_formats_store_them(bits, group, act_order):
    """w / scale is an integer in range; the export's numpy grid, given the scales, stores q * scale."""
    w, h = _weight(6, 8, 40) * 2, _hessian(_inputs(7, 40))
    q, out = _rounded(w, h.clone(), bits, group, act_order=act_order, blocksize=48 if group == 24 else 16)
    grid = Grid(bits, group)
    ratio = q / grid.per_column(out.scales, 40)
    assert (ratio - ratio.round()).abs().max() < 1e-5
    assert grid.levels[0] <= ratio.round().min() and ratio.round().max() <= grid.levels[1]
    if bits == 4:
        ints, scale = int4_blocks(q.T.numpy(), group, out.scales.T.numpy())
        stored = ints.astype(np.float32) * np.repeat(scale, group, 0)[:40]
        assert np.array_equal(stored.T, q.numpy())
    else:
        ints, scale = int8_per_channel(q.numpy(), 0, out.scales[:, 0].numpy())
        assert np.array_equal(ints.astype(np.float32) * scale[:, None], q.numpy())


def test_output_error_by_slices_of_rows_equals_the_whole_trace(monkeypatch):
    w, h = _weight(50, 6, 8), _hessian(_inputs(51, 8))
    new = Grid(4, 8).nearest(w)
    d = (w - new).double()
    whole = float(0.5 * ((d @ h.double()) * d).sum())
    monkeypatch.setattr(gptq_module, "_SLICE", 16)  # 2 rows per slice
    assert output_error(w, new, h) == pytest.approx(whole, rel=1e-6)  # fp32 products, fp64 sum


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits, group", [(4, 16), (4, None), (8, None)])
def test_layer_output_error_below_round_to_nearest(seed, bits, group):
    x, w = _inputs(10 + seed, 64, tokens=512), _weight(20 + seed, 32, 64)
    h = _hessian(x)
    for act_order in (False, True):
        q, out = _rounded(w, h.clone(), bits, group, act_order=act_order, blocksize=32)
        rtn = Grid(bits, group).nearest(w)
        gptq_err, rtn_err = (x @ (w - q).T).norm(), (x @ (w - rtn).T).norm()
        assert gptq_err < 0.9 * rtn_err, (act_order, gptq_err, rtn_err)
        loss = output_error(w, q, h)
        assert loss == pytest.approx(float(gptq_err.double() ** 2 / 512), rel=1e-4)  # mean ||(W - Q) x||^2
        assert loss < output_error(w, rtn, h)
        rows = [output_error(w[r:r + 1], q[r:r + 1], h) for r in range(32)]  # the walk's own errors
        torch.testing.assert_close(out.row_error, torch.tensor(rows, dtype=torch.float64), rtol=1e-3, atol=1e-7)


def test_the_hessian_is_consumed_and_dead_inputs_count_no_error():
    """H's memory becomes the factor (no second K x K matrix); a dead input's weight is zeroed at no error."""
    x = _inputs(60, 16)
    x[:, 3] = 0
    w, h = _weight(61, 4, 16), _hessian(x)
    given = h.clone()
    q, out = _rounded(w, given, 4, 8, blocksize=8)
    assert not torch.equal(given, h)  # overwritten in place
    torch.testing.assert_close(out.row_error.sum().item(), output_error(w, q, h), rtol=1e-3, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_pruned_zeros_stay_zero_and_dead_inputs_are_zeroed(act_order):
    x = _inputs(30, 32)
    x[:, 5] = 0  # an input the calibration never excites
    w = _weight(31, 16, 32)
    keep = torch.zeros(16, 8, 4, dtype=torch.bool)
    keep[:, :, :2] = True  # 2:4: the first two of every four kept
    w2 = w * keep.view(16, 32)
    q, out = _rounded(w2, _hessian(x), 4, 8, act_order=act_order, blocksize=16)
    assert (q[w2 == 0] == 0).all() and (q[:, 5] == 0).all()
    assert ((q.view(16, 8, 4) != 0).sum(-1) <= 2).all()  # still 2:4
    moved = q != Grid(4, 8).nearest(w2)
    assert moved[:, 6:].any()  # the kept weights did compensate


def test_errors():
    w, h = _weight(40, 3, 8), _hessian(_inputs(41, 8))
    with pytest.raises(ValueError, match="blocksize 12 must be a multiple of group_size 8"):
        gptq(w, h.clone(), 4, 8, blocksize=12)
    _rounded(w, h.clone(), 4, 8, blocksize=12, act_order=True)  # static groups: any block size
    with pytest.raises(ValueError, match="bits 3: the formats store 4 or 8"):
        gptq(w, h.clone(), 3, 8)
    with pytest.raises(ValueError, match=r"Hessian \(8, 8\) does not match weight \(3, 4\)"):
        gptq(w[:, :4], h.clone(), 4, 4)
    with pytest.raises(ValueError, match="q_proj: the damped Hessian is not positive definite"):
        gptq(w, -h, 4, 8, name="q_proj")


@pytest.mark.parametrize("group, act_order", [(8, False), (8, True), (None, False)])
def test_slices_of_rows_walk_as_the_whole_matrix(monkeypatch, group, act_order):
    """Rows are independent given the factor: walking 3 rows at a time gives the one-slice result."""
    w, h = _weight(70, 10, 32), _hessian(_inputs(71, 32))
    q, whole = _rounded(w, h.clone(), 4, group, act_order=act_order, blocksize=16)
    monkeypatch.setattr(gptq_module, "_ROWS", 3 * 32)
    q_sliced, sliced = _rounded(w, h.clone(), 4, group, act_order=act_order, blocksize=16)
    for a, b in zip((q, whole.scales, whole.row_error), (q_sliced, sliced.scales, sliced.row_error)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_narrower_weight_is_rounded_in_place_to_the_fp32_result_cast_once():
    w, h = _weight(80, 8, 32), _hessian(_inputs(81, 32))
    half = w.bfloat16()
    q, _ = _rounded(half.float(), h.clone(), 4, 16, blocksize=16)
    storage = half.data_ptr()
    gptq(half, h.clone(), 4, 16, blocksize=16)
    assert half.data_ptr() == storage and torch.equal(half, q.bfloat16())
