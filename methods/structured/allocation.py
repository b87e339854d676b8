"""Allocation: from channel scores to what every block keeps (docs/methods/structured-pruning.md §4, §8).

Uniform structures (UL) remove the same share in every layer from raw scores; adaptive ones (AL)
standardise each layer's scores and rank units globally, each unit weighted by its parameter count.
Deviations from the reference (recorded in the stage metrics): the global threshold keeps the top-k
units whose cumulative weight is closest to the target (the reference keeps one unit fewer); floors
of kept heads/channels per layer exist; kept MLP widths are rounded to a multiple of ``align``,
preserving the global total for adaptive structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.adapters import Block

from .base import StructuredArgs
from .units import Unit, attention_units, mlp_units


@dataclass
class BlockPlan:
    """What one block keeps, and the (standardised, for AL) scores it was decided on."""

    block: Block
    heads: list[int]
    kv_heads: list[int]
    channels: list[int]
    attn_scores: torch.Tensor | None = None
    mlp_scores: torch.Tensor | None = None

    def removed_heads(self) -> list[int]:
        return sorted(set(range(self.block.num_heads)) - set(self.heads))

    def removed_channels(self) -> list[int]:
        return sorted(set(range(self.block.intermediate_size)) - set(self.channels))


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-layer z-score with the unbiased std, as FLAP's AL structures do."""
    return (x - x.mean()) / x.std().clamp_min(1e-12)


def keep_top_by_weight(units: list[Unit], target_kept: float) -> set[int]:
    """Indices (into ``units``) of the top-scored units whose cumulative weight is closest to the target.

    Floor-forced units come first, so floors never push the total off target.
    """
    order = sorted(range(len(units)), key=lambda i: (not units[i].forced, -units[i].score))
    cum, best, best_k = 0.0, abs(target_kept), 0
    for k, i in enumerate(order, 1):
        cum += units[i].params
        if abs(cum - target_kept) < best:
            best, best_k = abs(cum - target_kept), k
    forced = sum(u.forced for u in units)
    return set(order[: max(best_k, forced)])


def align_counts(counts: list[float], align: int, lo: list[int], hi: list[int], keep_total: bool) -> list[int]:
    """Round per-layer channel counts to multiples of ``align`` within [lo, hi].

    ``keep_total``: largest-remainder rounding so the sum stays the target rounded to ``align``
    (adaptive structures); otherwise each layer rounds to its nearest multiple.
    """
    lo = [min(h, math.ceil(x / align) * align) for x, h in zip(lo, hi)]
    if not keep_total:
        return [max(lo_, min(h, int(math.floor(c / align + 0.5)) * align)) for c, lo_, h in zip(counts, lo, hi)]
    base = [max(lo_, min(h, int(c // align) * align)) for c, lo_, h in zip(counts, lo, hi)]
    target = round(sum(counts) / align) * align
    remainders = sorted(range(len(counts)), key=lambda i: counts[i] - base[i], reverse=True)
    spare = (target - sum(base)) // align
    for i in remainders:
        if spare <= 0:
            break
        if base[i] + align <= hi[i]:
            base[i] += align
            spare -= 1
    return base


def drop_lowest(units: list[Unit], n: int) -> list[Unit]:
    """Remove the ``n`` lowest-scored units that no floor protects."""
    removable = sorted((u for u in units if not u.forced), key=lambda u: u.score)
    drop = {id(u) for u in removable[:n]}
    return [u for u in units if id(u) not in drop]


def allocate(args: StructuredArgs, blocks: list[Block], attn: dict[int, torch.Tensor], mlp: dict[int, torch.Tensor],
             hidden: int, n_blocks: int) -> list[BlockPlan]:
    """Decide what each block keeps from its raw channel scores (``attn``/``mlp``: block index -> scores
    of the pruned modules; ``n_blocks``: how many blocks the stage prunes in all, for per-call blocks)."""
    adaptive = args.adaptive
    attn_units, mlp_by_block, plans = [], {}, []
    for b in blocks:
        plan = BlockPlan(b, list(range(b.num_heads)), list(range(b.num_kv_heads)), list(range(b.intermediate_size)))
        if args.attention:
            plan.attn_scores = standardize(attn[b.index]) if adaptive else attn[b.index]
            attn_units += attention_units(b, plan.attn_scores, args.gqa, args.min_heads, adaptive, hidden)
        if args.mlp:
            plan.mlp_scores = standardize(mlp[b.index]) if adaptive else mlp[b.index]
            per_channel = (len(b.mlp_in) + 1) * hidden
            mlp_by_block[b.index] = mlp_units(b, plan.mlp_scores, per_channel, args.min_channels or args.align)
        plans.append(plan)
    total = sum(u.params for u in attn_units) + sum(u.params for us in mlp_by_block.values() for u in us)
    kept_attn, kept_channels = select(args, blocks, attn_units, mlp_by_block, total, n_blocks)
    if args.mlp:
        counts = [len(kept_channels[b.index]) for b in blocks]
        aligned = align_counts(counts, args.align, [args.min_channels or args.align] * len(blocks),
                               [b.intermediate_size for b in blocks], keep_total=adaptive)
        for plan, c in zip(plans, aligned):
            plan.channels = sorted(plan.mlp_scores.argsort(descending=True, stable=True)[:c].tolist())
    if args.attention:
        for b, plan in zip(blocks, plans):
            units = [u for u in kept_attn if u.block == b.index]
            if args.gqa == "per-group" and b.num_heads > b.num_kv_heads:
                removed = {h for u in attn_units if u.block == b.index and u not in units for h in u.heads}
                plan.heads = [h for h in range(b.num_heads) if h not in removed]
            else:
                plan.heads = sorted(h for u in units for h in u.heads)
                plan.kv_heads = sorted(k for u in units for k in u.kv_heads)
    return plans


def select(args: StructuredArgs, blocks: list[Block], attn_units: list[Unit], mlp_by_block: dict[int, list[Unit]],
           total: int, n_blocks: int) -> tuple[list[Unit], dict[int, list[int]]]:
    """Apply the structure: the attention units kept, and the channels each block keeps."""
    p = args.ratio
    mlp_all = [u for us in mlp_by_block.values() for u in us]
    if args.structure == "AL-AM":
        units = attn_units + mlp_all
        kept = keep_top_by_weight(units, (1 - p) * total)
        kept_attn = [u for i, u in enumerate(units) if i in kept and u.kind == "attn"]
        kept_mlp = [u for i, u in enumerate(units) if i in kept and u.kind == "mlp"]
        return kept_attn, _by_block(blocks, kept_mlp)
    per_block_units = {b.index: [u for u in attn_units if u.block == b.index] for b in blocks}
    n_units = max((len(us) for us in per_block_units.values()), default=0)
    remove_heads = args.remove_heads if args.remove_heads is not None else int(p * n_units) * n_blocks
    if args.structure == "UL-UM":
        kept_attn = [u for us in per_block_units.values() for u in drop_lowest(us, int(p * len(us)))]
        kept_mlp = [u for us in mlp_by_block.values() for u in drop_lowest(us, int(p * len(us)))]
        return kept_attn, _by_block(blocks, kept_mlp)
    if args.structure == "UL-MM":
        kept_attn, kept_mlp = [], []
        for b in blocks:
            us = per_block_units[b.index]
            kept = drop_lowest(us, min(remove_heads // n_blocks, len(us)))
            kept_attn += kept
            mlp = mlp_by_block.get(b.index, [])
            layer_total = sum(u.params for u in us) + sum(u.params for u in mlp)
            removed_attn = sum(u.params for u in us) - sum(u.params for u in kept)
            r = int(max(0.0, p * layer_total - removed_attn) / mlp[0].params) if mlp else 0
            kept_mlp += drop_lowest(mlp, r)
        return kept_attn, _by_block(blocks, kept_mlp)
    # AL-MM: exactly remove_heads units and the rest of the budget in channels, both global
    kept_attn = drop_lowest(attn_units, remove_heads)
    removed_attn = sum(u.params for u in attn_units) - sum(u.params for u in kept_attn)
    r = int(max(0.0, p * total - removed_attn) / mlp_all[0].params) if mlp_all else 0
    return kept_attn, _by_block(blocks, drop_lowest(mlp_all, r))


def _by_block(blocks: list[Block], kept_mlp: list[Unit]) -> dict[int, list[int]]:
    out = {b.index: [] for b in blocks}
    for u in kept_mlp:
        out[u.block].append(u.channel)
    return out
