"""Wanda-sp: Wanda's score summed over output rows, the FLAP authors' structured baseline
(arXiv 2312.11983 / 2306.11695; docs/methods/structured-pruning.md §9).

Recipe: ``{type: prune_structured, method: wanda-sp, ratio: 0.2}``.
"""

from __future__ import annotations

from typing import Literal

import torch

from calibration.collectors import Stats

from .base import SCORES, ChannelScore, Structure, StructuredArgs


def wanda_channel(weight: torch.Tensor, stats: Stats) -> torch.Tensor:
    """mean_i |W_ij| sqrt(s_j): Wanda's weight score averaged over the output rows."""
    return (weight.float().abs() * stats.sq_norm.sqrt().unsqueeze(0)).mean(0)


@SCORES.register
class WandaSP(ChannelScore):
    """Calibrates sequentially under UL structures (it decides per layer), densely under AL ones."""

    name = "wanda-sp"
    sequential = True

    class Args(StructuredArgs):
        method: Literal["wanda-sp"]
        structure: Structure = "UL-UM"
        bias_compensation: bool = False
        square_attention: bool = False

    def activations(self):
        return {"sq_norm"}

    def channel(self, weight, stats):
        return wanda_channel(weight, stats)
