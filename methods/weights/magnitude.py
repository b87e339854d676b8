"""Magnitude pruning, the baseline (docs/methods/weight-pruning.md §3).

Recipe: ``{type: prune_weights, method: magnitude, sparsity: 0.5}``.
"""

from __future__ import annotations

from typing import Literal

from .base import CRITERIA, Criterion, WeightArgs


@CRITERIA.register
class Magnitude(Criterion):
    """|W_ij|, one threshold per whole matrix (unstructured) or per M-group (N:M); no calibration data."""

    name = "magnitude"
    matrix_group = True
    row_scores = True

    class Args(WeightArgs):
        method: Literal["magnitude"]

    def score(self, name, weight, stats):
        return weight.abs()
