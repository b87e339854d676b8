"""VisionZip (arXiv 2412.04467): dominant patches by [CLS] attention, plus contextual tokens merged from the rest.

Follows docs/methods/token-pruning.md §10. Of K = D + C tokens, D are the patches [CLS] attends to
most; the other N − D patches are compared by their head-averaged, L2-normalised keys, C of them
(every ⌊(N − D)/C⌋-th in raster order) become targets, and each remaining patch is merged into its
most similar target: contextual token = target state + mean of the states assigned to it. The
output keeps raster order over the D + C anchor patches (the reference puts all dominant tokens
first); a contextual token's index is its target's. C = ``contextual`` (a count, or
ceil(ratio·K) kept within [1, K − 1] when K ≥ 2; 0 when K = 1). The fused token (§9), if asked
for, weights the patches outside the K anchors by [CLS] attention.
Recipe: ``{type: token_prune, method: visionzip, layer: -2, keep: 64, output: true}`` (D = 54, C = 10).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator

from core.errors import RecipeError

from .attention import cls_attention, mean_keys
from .base import SELECTORS, Build, Method, Selection, SelectorArgs
from .select import dropped, gather_rows, raster_permutation

REFERENCE_RATIO = 10 / 64  # the reference's contextual share: 54 + 10, 108 + 20, 162 + 30 tokens


def contextual_count(k: int, contextual: int | float) -> int:
    """C for K tokens: a count as given, a ratio as ceil(ratio·K) within [1, K − 1] (0 when K = 1 or ratio 0)."""
    if isinstance(contextual, int):
        return contextual
    if k == 1 or contextual == 0:
        return 0
    return min(max(1, math.ceil(k * contextual)), k - 1)


def targets(remaining: int, c: int) -> tuple[list[int], list[int]]:
    """Positions among the ``remaining`` patches (raster order) of the C targets, every ⌊n/C⌋-th, and of the rest."""
    step = max(1, remaining // c)
    chosen = list(range(0, remaining, step))[:c]
    return chosen, sorted(set(range(remaining)) - set(chosen))


@SELECTORS.register
class VisionZip(Method):
    name = "visionzip"

    class Args(SelectorArgs):
        method: Literal["visionzip"]
        contextual: int | float = REFERENCE_RATIO  # contextual tokens: a count, or a ratio of keep (ceil)

        @field_validator("contextual", mode="before")
        @classmethod
        def _contextual(cls, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"contextual {v!r} is neither a count of merged tokens (e.g. 10) nor a ratio of "
                                 "keep in [0, 1)")
            if isinstance(v, int) and v < 0:
                raise ValueError(f"contextual {v} is negative: give a count >= 0 or a ratio of keep in [0, 1)")
            if isinstance(v, float) and not 0 <= v < 1:
                raise ValueError(f"contextual {v} is not a ratio of keep in [0, 1); write a count as an integer")
            return v

    def __init__(self, k: int, contextual: int):
        super().__init__(k)
        self.contextual, self.dominant = contextual, k - contextual

    @classmethod
    def validate(cls, args, spec, model, adapter, field):
        if adapter.vision_tokens(model).prefix < 1:
            raise RecipeError("visionzip ranks patches by [CLS] attention and this encoder has no [CLS] token "
                              "(use global_attention or divprune)", field=f"{field}.method")

    @classmethod
    def resolve(cls, args, layer, blocks, keep, field):
        """At least one dominant token: a contextual count below keep."""
        if keep is not None and isinstance(args.contextual, int) and args.contextual >= keep:
            raise RecipeError(f"contextual {args.contextual} leaves no dominant token of keep {keep}: "
                              f"give at most {keep - 1}", field=f"{field}.contextual")
        return None

    @classmethod
    def build(cls, args, k, env):
        return Build(cls(k, contextual_count(k, args.contextual)))

    def select(self, tap):
        x, n = tap.patches, tap.patches.shape[1]
        score = cls_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        dominant = score.topk(self.dominant, dim=-1, largest=True, sorted=True).indices
        if not self.contextual:
            order = raster_permutation(dominant)
            return Selection(dominant.gather(-1, order), score)
        keys = F.normalize(mean_keys(tap.model, tap.block, tap.x_in)[:, tap.prefix:], dim=-1)
        idx, tokens = self._merge(x, keys, _remaining(dominant, n))
        idx, tokens = torch.cat([dominant, idx], dim=1), torch.cat([gather_rows(x, dominant), tokens], dim=1)
        order = raster_permutation(idx)
        return Selection(idx.gather(-1, order), score, gather_rows(tokens, order))

    def _merge(self, x: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The C target indices [B, C] among ``rest`` and their contextual tokens [B, C, D].

        Assignment without scatter: ArgMax over the targets, one-hot by Equal against an arange,
        then MatMul sums; counts are clamped to 1 so a target nobody joins keeps its own state.
        """
        chosen, others = targets(rest.shape[1], self.contextual)
        target = rest[:, chosen]
        states = gather_rows(x, target).float()
        if others:  # empty only when K = N: every remaining patch is a target
            other = rest[:, others]
            sim = torch.matmul(gather_rows(keys, other), gather_rows(keys, target).transpose(1, 2))  # [B, M, C]
            choice = sim.argmax(dim=-1, keepdim=True)
            assign = (choice == torch.arange(self.contextual, device=x.device)).to(torch.float32)
            counts = assign.sum(dim=1).clamp_min(1.0).unsqueeze(-1)  # [B, C, 1]
            states = states + torch.matmul(assign.transpose(1, 2), gather_rows(x, other).float()) / counts
        return target, states.to(x.dtype)


def _remaining(dominant: torch.Tensor, n: int) -> torch.Tensor:
    """[B, N − D]: the patches outside ``dominant``, ascending — one TopK over −position, the dominant pushed below."""
    positions = torch.arange(n, device=dominant.device, dtype=torch.float32)
    score = -positions - n * (1.0 - dropped(dominant, n))
    return score.topk(n - dominant.shape[1], dim=-1, largest=True, sorted=True).indices
