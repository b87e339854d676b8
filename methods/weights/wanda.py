"""Wanda: pruning by weights and activations (arXiv 2306.11695; docs/methods/weight-pruning.md §4).

Recipe: ``{type: prune_weights, method: wanda, pattern: "2:4"}``.
"""

from __future__ import annotations

from typing import Literal

from .base import CRITERIA, Criterion, WeightArgs


@CRITERIA.register
class Wanda(Criterion):
    """|W_ij| * sqrt(s_j), s_j = ||X_j||^2 / N over the calibration sequences, compared within each output row."""

    name = "wanda"
    activations = frozenset({"sq_norm"})
    row_scores = True

    class Args(WeightArgs):
        method: Literal["wanda"]

    def score(self, name, weight, stats):
        return weight.abs().mul_(stats.sq_norm.sqrt().unsqueeze(0))  # in place: no third Linear-sized copy
