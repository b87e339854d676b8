"""HiPrune (arXiv 2508.00553): anchors from an object layer, their 4-neighbours, then registers from the deep layer.

Follows docs/methods/token-pruning.md §8. ``anchors`` = round(K·α/5); neighbours are idx±1 and
idx±W clamped to [0, N-1] with no row-wrap handling, as the reference. The union without
``unique`` (§8.3): anchor/buffer tokens get +2 on a deep score that is at most 1, so one TopK ranks
them first, then the best remaining tokens.
Recipe: ``{type: token_prune, method: hiprune, layer: -2, keep: 64, alpha: 0.1, output: true}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from core.errors import RecipeError

from .attention import global_attention
from .base import SELECTORS, Build, Env, Method, Selection, SelectorArgs, block_index
from .select import top_k_raster

OBJECT_FRACTION = 8 / 22  # the reference's object layer 9 of LLaVA's feature layer 23 (1-based)


def anchor_count(k: int, alpha: float) -> int:
    """The reference's anchor count round(K·α/5) (Python rounding, half to even)."""
    return round(k * alpha / 5)


@SELECTORS.register
class HiPrune(Method):
    name = "hiprune"

    class Args(SelectorArgs):
        method: Literal["hiprune"]
        object_layer: int | None = None  # block whose attention picks the anchors (default round(layer·8/22))
        alpha: float = Field(default=0.1, gt=0, le=1)  # anchor share of the budget (anchors = round(K·α/5))

    def __init__(self, k: int, anchors: int):
        super().__init__(k)
        self.anchors = anchors

    @classmethod
    def resolve(cls, args, layer, blocks, keep, field):
        """The object layer (at or before the pruning block), and an alpha whose 5 neighbourhoods fit in K."""
        obj = (round(layer * OBJECT_FRACTION) if args.object_layer is None
               else block_index(args.object_layer, blocks, f"{field}.object_layer"))
        if obj > layer:
            raise RecipeError(f"object_layer {obj} comes after the pruning layer {layer}; "
                              "its attention must be computed first", field=f"{field}.object_layer")
        if keep is not None and 5 * anchor_count(keep, args.alpha) > keep:
            raise RecipeError(f"alpha {args.alpha:g} gives {anchor_count(keep, args.alpha)} anchors, whose 5 "
                              f"neighbourhoods can exceed keep {keep}: lower alpha", field=f"{field}.alpha")
        return obj

    @classmethod
    def build(cls, args, k: int, env: Env) -> Build:
        return Build(cls(k, anchor_count(k, args.alpha)))

    def select(self, tap):
        deep = global_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        score = deep
        if self.anchors:
            n, w = deep.shape[-1], tap.cols
            a = tap.object_score.topk(self.anchors, dim=-1).indices
            neighbours = torch.cat([a, a - 1, a + 1, a - w, a + w], dim=-1).clamp(0, n - 1)
            chosen = (neighbours.unsqueeze(-1) == torch.arange(n, device=a.device)).to(deep.dtype).amax(dim=1)
            score = deep + 2.0 * chosen
        return Selection(top_k_raster(score, self.k), deep)
