"""Removable units: an attention unit (query heads with the KV heads only they use) or an MLP channel,
each with its score and its parameter count (docs/methods/structured-pruning.md §1, §7, §8)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.adapters import Block


@dataclass
class Unit:
    block: int
    kind: str  # "attn" | "mlp"
    heads: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()
    channel: int = -1
    params: int = 0
    score: float = 0.0
    forced: bool = False  # kept by a floor


def attention_units(block: Block, per_channel: torch.Tensor, gqa: str, min_heads: int, adaptive: bool,
                    hidden: int) -> list[Unit]:
    """Score the removable attention units of a block from per-o_proj-channel scores.

    Unit score: mean of standardised channel scores (adaptive structures) or sum of raw ones (UL).
    GQA `group`: a KV head with its g query heads; `per-group`: bundles made of the next
    lowest-ranked query head of every group (removing a bundle keeps groups equal-sized).
    """
    hd, nh, nkv = block.head_dim, block.num_heads, block.num_kv_heads
    g = nh // nkv
    head_score = per_channel.view(nh, hd)
    head_score = head_score.mean(1) if adaptive else head_score.sum(1)
    if gqa == "group" or g == 1:
        group = [head_score[k * g:(k + 1) * g] for k in range(nkv)]
        units = [Unit(block.index, "attn", heads=tuple(range(k * g, (k + 1) * g)), kv_heads=(k,),
                      params=(2 * g + 2) * hd * hidden, score=float(s.mean() if adaptive else s.sum()))
                 for k, s in enumerate(group)]
        keep_floor = math.ceil(min_heads / g)
    else:
        ranked = head_score.view(nkv, g).argsort(dim=1, stable=True)  # lowest first, per group
        units = []
        for r in range(g):
            heads = tuple(sorted(int(k * g + ranked[k, r]) for k in range(nkv)))
            scores = head_score[list(heads)]
            units.append(Unit(block.index, "attn", heads=heads, params=nkv * 2 * hd * hidden,
                              score=float(scores.mean() if adaptive else scores.sum())))
        keep_floor = max(1, math.ceil(min_heads / nkv))
    for u in sorted(units, key=lambda u: u.score, reverse=True)[:keep_floor]:
        u.forced = True
    return units


def mlp_units(block: Block, scores: torch.Tensor, params: int, floor: int) -> list[Unit]:
    """One unit per intermediate channel; the ``floor`` best are forced."""
    units = [Unit(block.index, "mlp", channel=j, params=params, score=float(s)) for j, s in enumerate(scores)]
    for j in scores.argsort(descending=True, stable=True)[:floor].tolist():
        units[j].forced = True
    return units
