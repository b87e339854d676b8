"""Wanda's score by hand, and the statistic it reads."""

from __future__ import annotations

import torch

from calibration.collectors import InputStats, Stats
from methods.weights.wanda import Wanda


def _stats(x: torch.Tensor) -> Stats:
    s = InputStats(Wanda.activations)
    s.update(x, None)
    return Stats(s.tensors())


def test_wanda_score_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    x = torch.tensor([[[1.0, 1.0, 0.0, 2.0], [1.0, 3.0, 0.0, 0.0]]])  # one sequence of 2 tokens
    # s_j = sum_tokens x_j^2 / N(=1) = [2, 10, 0, 4] -> score = |w| * sqrt(s)
    expected = torch.tensor([[2 ** 0.5, 2 * 10 ** 0.5, 0.0, 8.0]])
    wanda = Wanda(Wanda.Args(method="wanda", sparsity=0.5))
    torch.testing.assert_close(wanda.score("l", w, _stats(x)), expected)
    # half of the row: the two lowest scores (columns 0 and 2) go
    assert wanda.mask("l", w, _stats(x)).tolist() == [[True, False, True, False]]


def test_sq_norm_is_per_sequence_mean_like_the_reference():
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(_stats(x).sq_norm, (x.reshape(-1, 4) ** 2).sum(0) / 3)


def test_wanda_compares_within_rows_and_has_no_own_arguments():
    w = torch.tensor([[1.0, 2.0], [30.0, 40.0]])
    mask = Wanda(Wanda.Args(method="wanda", sparsity=0.5)).mask("l", w, _stats(torch.ones(1, 1, 2)))
    assert mask.sum(1).tolist() == [1, 1]  # a whole-matrix threshold would take row 0 only
    assert Wanda(Wanda.Args(method="wanda", pattern="2:4")).cache_fields() == {}


def test_scored_a_slice_of_rows_at_a_time_the_mask_is_the_whole_weights(monkeypatch):
    """Wanda scores a few rows at a time (no whole fp32 copy of the weight); the masks do not change."""
    from methods.weights import base

    w = torch.randn(9, 16).to(torch.bfloat16)
    stats = _stats(torch.randn(2, 5, 16))
    for args in (Wanda.Args(method="wanda", pattern="2:4"), Wanda.Args(method="wanda", sparsity=0.3)):
        whole = base.nm_mask(Wanda(args).score("l", w.float(), stats), 2, 4) if args.nm else \
            base.row_mask(Wanda(args).score("l", w.float(), stats), 0.3)
        monkeypatch.setattr(base, "_SORTED", 40)  # 2 rows per slice
        assert torch.equal(Wanda(args).mask("l", w, stats), whole)
        monkeypatch.undo()
