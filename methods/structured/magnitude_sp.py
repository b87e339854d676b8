"""Magnitude-sp: the column L2 norm, the FLAP authors' weights-only baseline
(docs/methods/structured-pruning.md §9).

Recipe: ``{type: prune_structured, method: magnitude-sp, ratio: 0.2}``.
"""

from __future__ import annotations

from typing import Literal

from .base import SCORES, ChannelScore, Structure, StructuredArgs


@SCORES.register
class MagnitudeSP(ChannelScore):
    """||W_:j||_2; reads no calibration data (unless bias compensation asks for the means)."""

    name = "magnitude-sp"

    class Args(StructuredArgs):
        method: Literal["magnitude-sp"]
        structure: Structure = "UL-UM"
        bias_compensation: bool = False
        square_attention: bool = False

    def activations(self):
        return set()

    def channel(self, weight, stats):
        return weight.float().norm(dim=0)
