"""Masks against hand computations and brute force; the common arguments; the data criteria declare."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError

from methods.weights import CRITERIA, base, matrix_mask, nm_mask, row_mask


def _args(**kw):
    return CRITERIA[kw["method"]].Args(**kw)


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


def test_masks_sorted_a_few_rows_at_a_time_equal_one_sort(monkeypatch):
    """Per-row masks sort slices of rows (bounded temporaries); the mask is the whole-matrix sort's."""
    score = torch.randint(0, 4, (9, 16)).float()  # ties, so a stable order matters
    whole = row_mask(score, 0.5), nm_mask(score, 2, 4)
    monkeypatch.setattr(base, "_SORTED", 40)  # 2 rows per slice, the last one a single row
    assert torch.equal(row_mask(score, 0.5), whole[0]) and torch.equal(nm_mask(score, 2, 4), whole[1])


def test_args_target_sparsity():
    assert _args(method="wanda", pattern="2:4").target_sparsity == 0.5
    assert _args(method="wanda", pattern="1:4").target_sparsity == 0.75
    assert _args(method="wanda", sparsity=0.3).target_sparsity == 0.3
    assert _args(method="magnitude", pattern="2:4").nm == (2, 4) and _args(method="gblm", sparsity=0.3).nm is None


@pytest.mark.parametrize("kw, words", [
    ({"pattern": "2-4"}, "pattern '2-4' is not allowed"),
    ({"pattern": "4:4"}, "0 < N < M is required"),
    ({"pattern": "2:4", "sparsity": 0.3}, "contradicts pattern 2:4"),
    ({}, "unstructured pruning needs 'sparsity'"),
])
def test_args_refuse_bad_patterns(kw, words):
    with pytest.raises(ValidationError, match=words):
        _args(method="wanda", **kw)


def test_criteria_are_registered_by_name():
    from methods.weights.gblm import GBLM
    from methods.weights.magnitude import Magnitude
    from methods.weights.sparsegpt import SparseGPT
    from methods.weights.wanda import Wanda

    assert sorted(CRITERIA.names()) == ["gblm", "magnitude", "sparsegpt", "wanda"]
    assert (CRITERIA["magnitude"], CRITERIA["wanda"], CRITERIA["gblm"], CRITERIA["sparsegpt"]) == (
        Magnitude, Wanda, GBLM, SparseGPT)


def _pruned(criterion, weight: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """A pruned copy of ``weight`` (criteria prune in place) and the mask."""
    new = weight.clone()
    return new, criterion.prune("l", new, stats)


def test_default_prune_zeroes_the_mask_and_keeps_the_rest():
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0], [4.0, 0.1, -0.2, 3.0]], dtype=torch.float16)
    magnitude = CRITERIA["magnitude"](_args(method="magnitude", pattern="2:4"))
    storage = w.data_ptr()
    mask = magnitude.prune("l", w, None)
    assert mask.tolist() == [[True, False, True, False], [False, True, True, False]]
    assert w.data_ptr() == storage and w.dtype == torch.float16  # in place
    assert w.tolist() == [[0.0, -3.0, 0.0, 2.0], [4.0, 0.0, 0.0, 3.0]]


@pytest.mark.parametrize("method, propagation, dense", [
    ("magnitude", "sequential", set()), ("magnitude", "dense", set()),
    ("wanda", "sequential", set()), ("wanda", "dense", {"sq_norm"}),
    ("gblm", "sequential", {"gradients"}), ("gblm", "dense", {"gradients", "sq_norm"}),
    ("sparsegpt", "sequential", set()), ("sparsegpt", "dense", {"hessian"}),
])
def test_dense_statistics_follow_the_declarations(method, propagation, dense):
    assert CRITERIA[method].dense_statistics(_args(method=method, sparsity=0.5, propagation=propagation)) == dense
