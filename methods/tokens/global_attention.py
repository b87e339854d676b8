"""Global attention (docs/methods/token-pruning.md §6): the patches that receive the most attention from all queries.

For encoders without [CLS] (SigLIP); the deep-layer score of HiPrune (arXiv 2508.00553), VisPruner
and VisionZip. The fused token (§9) weights the dropped patches by this score.
Recipe: ``{type: token_prune, method: global_attention, layer: 2, keep: 49}``.
"""

from __future__ import annotations

from typing import Literal

from .attention import global_attention
from .base import SELECTORS, Method, Selection, SelectorArgs
from .select import top_k_raster


@SELECTORS.register
class GlobalAttention(Method):
    name = "global_attention"

    class Args(SelectorArgs):
        method: Literal["global_attention"]

    def select(self, tap):
        score = global_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        return Selection(top_k_raster(score, self.k), score)
