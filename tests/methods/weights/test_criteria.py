"""Scores and masks against hand computations and brute-force references."""

from __future__ import annotations

import itertools

import pytest
import torch

from calibration.collectors import InputStats, Stats
from stages.prune_weights import GBLM, Magnitude, PruneWeightsArgs, Wanda, matrix_mask, nm_mask, row_mask


def _args(**kw):
    return PruneWeightsArgs(type="prune_weights", **kw)


def _stats(x: torch.Tensor) -> Stats:
    s = InputStats({"sq_norm"})
    s.update(x, None)
    return Stats(s.tensors())


def test_wanda_score_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    x = torch.tensor([[[1.0, 1.0, 0.0, 2.0], [1.0, 3.0, 0.0, 0.0]]])  # one sequence of 2 tokens
    # s_j = sum_tokens x_j^2 / N(=1) = [2, 10, 0, 4] -> score = |w| * sqrt(s)
    expected = torch.tensor([[2 ** 0.5, 2 * 10 ** 0.5, 0.0, 8.0]])
    stats = _stats(x)
    torch.testing.assert_close(Wanda(_args(method="wanda", sparsity=0.5), None).score("l", w, stats), expected)
    # half of the row: the two lowest scores (columns 0 and 2) go
    mask = Wanda(_args(method="wanda", sparsity=0.5), None).mask("l", w, stats)
    assert mask.tolist() == [[True, False, True, False]]


def test_sq_norm_is_per_sequence_mean_like_the_reference():
    x = torch.randn(3, 5, 4)
    s = _stats(x)
    torch.testing.assert_close(s.sq_norm, (x.reshape(-1, 4) ** 2).sum(0) / 3)


def test_gblm_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    x = torch.tensor([[[1.0, 2.0]]])
    grads = {"l": {"grad_sum_sq": torch.tensor([[9.0, 0.0], [16.0, 1.0]]),
                   "grad_sum_abs": torch.tensor([[3.0, 0.0], [5.0, 1.0]])}}
    l2 = GBLM(_args(method="gblm", sparsity=0.5), grads).score("l", w, _stats(x))
    # |W| sqrt(s) + |W| * 100 * sqrt(sum g^2)
    expected = torch.tensor([[1 * 1 + 1 * 300, 2 * 2 + 0], [0.5 * 1 + 0.5 * 400, 4 * 2 + 4 * 100]])
    torch.testing.assert_close(l2, expected)
    l1 = GBLM(_args(method="gblm", sparsity=0.5, gradient_norm="l1", gradient_scale=10), grads).score("l", w, _stats(x))
    torch.testing.assert_close(l1, torch.tensor([[1 + 30.0, 4.0], [0.5 + 25.0, 8 + 40.0]]))


def test_row_mask_prunes_exact_count_per_row():
    score = torch.rand(7, 10)
    mask = row_mask(score, 0.35)  # floor(10 * .35) = 3 per row
    assert mask.sum(1).tolist() == [3] * 7
    for r in range(7):  # the pruned ones are the three lowest
        assert set(mask[r].nonzero().flatten().tolist()) == set(score[r].argsort()[:3].tolist())


def test_matrix_mask_is_one_threshold_for_the_whole_matrix():
    score = torch.tensor([[0.1, 5.0, 6.0], [0.2, 0.3, 7.0]])
    mask = matrix_mask(score, 0.5)
    assert mask.tolist() == [[True, False, False], [True, True, False]]  # row 1 loses 2, row 0 loses 1


def test_magnitude_unstructured_and_nm():
    w = torch.tensor([[1.0, -0.5, 0.2, 3.0, -0.1, 0.3, 2.0, 0.4]])
    assert Magnitude(_args(method="magnitude", sparsity=0.25), None).mask("l", w, None).sum() == 2
    nm = Magnitude(_args(method="magnitude", pattern="2:4"), None).mask("l", w, None)
    assert nm.tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_brute_force(n, m):
    torch.manual_seed(n * 10 + m)
    score = torch.rand(5, 4 * m)
    mask = nm_mask(score, n, m)
    for r, g in itertools.product(range(5), range(4)):
        block = score[r, g * m:(g + 1) * m]
        pruned = set(mask[r, g * m:(g + 1) * m].nonzero().flatten().tolist())
        assert pruned == set(block.argsort()[: m - n].tolist())
    assert (mask.view(5, 4, m).sum(-1) == m - n).all()


def test_ties_break_by_position_stably():
    score = torch.ones(1, 8)
    assert row_mask(score, 0.5).tolist() == [[True] * 4 + [False] * 4]
    assert nm_mask(score, 2, 4).tolist() == [[True, True, False, False] * 2]


def test_args_target_sparsity():
    assert _args(method="wanda", pattern="2:4").target_sparsity == 0.5
    assert _args(method="wanda", pattern="1:4").target_sparsity == 0.75
    assert _args(method="wanda", sparsity=0.3).target_sparsity == 0.3
