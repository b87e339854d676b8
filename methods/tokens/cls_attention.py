"""[CLS] attention (FasterVLM arXiv 2412.01818, EViT arXiv 2202.07800): the patches [CLS] attends to most.

Follows docs/methods/token-pruning.md §5; the fused token (§9) weights the dropped patches by this score.
Recipe: ``{type: token_prune, method: cls_attention, layer: 2, keep: 0.25, fuse: true}``.
"""

from __future__ import annotations

from typing import Literal

from .attention import cls_attention
from .base import SELECTORS, Method, Selection, SelectorArgs
from .select import top_k_raster


@SELECTORS.register
class ClsAttention(Method):
    name = "cls_attention"

    class Args(SelectorArgs):
        method: Literal["cls_attention"]

    def select(self, tap):
        score = cls_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        return Selection(top_k_raster(score, self.k), score)
