"""Structured pruning: FLAP and the -sp baselines remove attention heads / KV groups and MLP channels.

Faithful to docs/methods/structured-pruning.md §3-§9:
- channel metrics at the inputs of the attention output projection and the MLP output
  projection: `ifv` (variance), `wifv` (variance x squared column norm, FLAP's default), `wifn`
  (mean_i |W_ij| sqrt(s_j), Wanda-sp's score); magnitude-sp uses the column L2 norm;
- FLAP squares the attention metric first (as its code does; `square_attention`);
- structures UL-UM, UL-MM, AL-MM, AL-AM (per-layer standardised scores ranked globally, each unit
  weighted by its parameter count);
- bias compensation b = W[:, P] mu[P] with the unsliced weight and the calibration means;
- GQA: whole KV groups (default) or the same number of query heads from every group.

Deviations, all recorded in the stage metrics: the variance is the exact unbiased one (the
reference approximates it); the global threshold keeps the top-k units whose cumulative weight is
closest to the target (the reference keeps scores strictly above the unit at that position, one
unit fewer); floors of kept heads/channels per layer exist (the reference has none and can empty
a layer); kept MLP widths are rounded to a multiple of `align`, preserving the global total for
adaptive structures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from models.adapters import Block, head_channels
from core.errors import RecipeError
from core.targets import select

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext

ALIGNS = (1, 8, 16, 32, 64, 128, 256)


class PruneStructuredArgs(StageArgs):
    type: Literal["prune_structured"]
    method: Literal["flap", "wanda-sp", "magnitude-sp"] = "flap"
    ratio: float = Field(gt=0, lt=1)
    metric: Literal["wifv", "ifv", "wifn"] | None = None
    structure: Literal["AL-AM", "UL-UM", "UL-MM", "AL-MM"] | None = None
    remove_heads: int | None = Field(default=None, ge=0)
    bias_compensation: bool | None = None
    square_attention: bool | None = None
    min_heads: int = Field(default=1, ge=1)
    min_channels: int | None = Field(default=None, ge=1)
    align: int = 64
    gqa: Literal["group", "per-group"] = "group"
    modules: Literal["attention+mlp", "attention", "mlp"] = "attention+mlp"
    targets: list[str] = ["re:.*"]
    ignore: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        """Fill the per-method defaults so the resolved recipe shows what actually ran."""
        if not isinstance(data, dict):
            return data
        flap = data.get("method", "flap") == "flap"
        defaults = {"metric": "wifv" if flap else None, "structure": "AL-AM" if flap else "UL-UM",
                    "bias_compensation": flap, "square_attention": flap}
        return {**{k: v for k, v in defaults.items() if data.get(k) is None}, **data}

    @model_validator(mode="after")
    def _check(self):
        if self.align not in ALIGNS:
            raise ValueError(f"align {self.align} is not allowed: use one of {', '.join(map(str, ALIGNS))}")
        if self.method != "flap" and self.metric is not None:
            raise ValueError(f"'metric' only applies to method 'flap' ({self.method} has its own score)")
        if self.remove_heads is not None and self.structure not in ("UL-MM", "AL-MM"):
            raise ValueError("'remove_heads' only applies to structures UL-MM and AL-MM")
        return self

    @property
    def sequential(self) -> bool:
        """Wanda-sp calibrates sequentially, which needs per-layer decisions (UL structures)."""
        return self.method == "wanda-sp" and self.structure.startswith("UL")

    @property
    def kinds(self) -> set[str]:
        kinds = {"mean_var"} if self.bias_compensation or self.metric in ("ifv", "wifv") else set()
        if self.method == "wanda-sp" or self.metric == "wifn":
            kinds.add("sq_norm")
        return kinds


# ---------------------------------------------------------------------------------------------
# Scores


def channel_metric(args: PruneStructuredArgs, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
    """One score per input column j of an output projection (attention or MLP)."""
    w = weight.float()
    if args.method == "magnitude-sp":
        return w.norm(dim=0)
    if args.method == "wanda-sp" or args.metric == "wifn":
        return (w.abs() * stats.sq_norm.sqrt().unsqueeze(0)).mean(0)
    if args.metric == "ifv":
        return stats.var
    return stats.var * (w * w).sum(0)  # wifv


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-layer z-score with the unbiased std, as FLAP's AL structures do."""
    return (x - x.mean()) / x.std().clamp_min(1e-12)


@dataclass
class Unit:
    """A removable piece: an attention unit (query heads with the KV heads only they use) or an MLP channel."""

    block: int
    kind: str  # "attn" | "mlp"
    heads: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()
    channel: int = -1
    params: int = 0
    score: float = 0.0
    forced: bool = False  # kept by a floor


@dataclass
class BlockPlan:
    block: Block
    heads: list[int]
    kv_heads: list[int]
    channels: list[int]
    attn_scores: torch.Tensor | None = None
    mlp_scores: torch.Tensor | None = None
    notes: dict = field(default_factory=dict)


def attention_units(block: Block, per_channel: torch.Tensor, args: PruneStructuredArgs, adaptive: bool,
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
    floor = args.min_heads
    if args.gqa == "group" or g == 1:
        group = [head_score[k * g:(k + 1) * g] for k in range(nkv)]
        units = [Unit(block.index, "attn", heads=tuple(range(k * g, (k + 1) * g)), kv_heads=(k,),
                      params=(2 * g + 2) * hd * hidden, score=float(s.mean() if adaptive else s.sum()))
                 for k, s in enumerate(group)]
        keep_floor = math.ceil(floor / g)
    else:
        ranked = head_score.view(nkv, g).argsort(dim=1, stable=True)  # lowest first, per group
        units = []
        for r in range(g):
            heads = tuple(sorted(int(k * g + ranked[k, r]) for k in range(nkv)))
            scores = head_score[list(heads)]
            units.append(Unit(block.index, "attn", heads=heads, params=nkv * 2 * hd * hidden,
                              score=float(scores.mean() if adaptive else scores.sum())))
        keep_floor = max(1, math.ceil(floor / nkv))
    for u in sorted(units, key=lambda u: u.score, reverse=True)[:keep_floor]:
        u.forced = True
    return units


def mlp_units(block: Block, scores: torch.Tensor, params: int, floor: int) -> list[Unit]:
    units = [Unit(block.index, "mlp", channel=j, params=params, score=float(s)) for j, s in enumerate(scores)]
    for j in scores.argsort(descending=True, stable=True)[:floor].tolist():
        units[j].forced = True
    return units


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


# ---------------------------------------------------------------------------------------------


class PruneStructured(Stage):
    type = "prune_structured"
    Args = PruneStructuredArgs
    changes_model = True

    @classmethod
    def needs_calibration(cls, args):
        if args.sequential:
            return "data"
        return "dense-statistics" if args.kinds else False

    @classmethod
    def statistics(cls, args):
        return set() if args.sequential else args.kinds

    @classmethod
    def describe(cls, args):
        return f"{args.method} {args.structure} ratio {args.ratio:g}"

    def validate(self, recipe, model, adapter, field):
        blocks = self._blocks(model, adapter, field)
        if self.args.gqa == "per-group" and all(b.num_heads == b.num_kv_heads for b in blocks):
            raise RecipeError("gqa 'per-group' needs grouped-query attention, and this model has one query head "
                              "per KV head; use 'group'", field=f"{field}.gqa")
        widths = {b.intermediate_size for b in blocks}
        if self.args.modules != "attention" and any(w < self.args.align for w in widths):
            raise RecipeError(f"align {self.args.align} exceeds an MLP width ({min(widths)}); use a smaller align",
                              field=f"{field}.align")

    def _blocks(self, model: nn.Module, adapter, field: str) -> list[Block]:
        blocks = adapter.blocks(model)
        chosen = select({b.prefix: b.module for b in blocks}, self.args.targets, self.args.ignore, field)
        return [b for b in blocks if b.prefix in chosen]

    @torch.no_grad()
    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        args = self.args
        t0 = time.perf_counter()
        blocks = self._blocks(ctx.model, ctx.adapter, "stages")
        before = self._prunable(ctx.model, blocks)
        shapes_before = {b.index: (b.num_heads, b.num_kv_heads, b.intermediate_size) for b in blocks}
        if args.sequential:
            engine = LayerwiseEngine(ctx.model, ctx.adapter, ctx.calibration,
                                     getattr(torch, ctx.recipe.calibration.dtype), ctx.events)
            targets = {b.index: {n: ctx.model.get_submodule(n) for n in (b.o, b.mlp_out)} for b in blocks}
            plans = []

            def prune_now(block, stats):
                plan = self._plan(ctx.model, [block], stats, self._hidden(ctx.model, block), len(blocks))[0]
                self._apply(ctx, plan, stats)
                plans.append(plan)

            engine.run(targets, args.kinds, "sequential", on_block=prune_now)
            source = "sequential"
        else:
            stats = ctx.statistics.dense if args.kinds else None
            plans = self._plan(ctx.model, blocks, stats, self._hidden(ctx.model, blocks[0]), len(blocks))
            for plan in plans:
                self._apply(ctx, plan, stats)
            source = "dense, from the calibrate stage" if stats else "none (weights only)"
        after_blocks = [b for b in ctx.adapter.blocks(ctx.model) if b.index in shapes_before]
        after = self._prunable(ctx.model, after_blocks)
        return self._report(args, shapes_before, after_blocks, before, after, source, time.perf_counter() - t0)

    @staticmethod
    def _hidden(model, block: Block) -> int:
        return model.get_submodule(block.o).out_features

    def _prunable(self, model: nn.Module, blocks: list[Block]) -> int:
        mods = {"attention+mlp": ("attn", "mlp"), "attention": ("attn",), "mlp": ("mlp",)}[self.args.modules]
        total = 0
        for b in blocks:
            names = (b.attn_linears if "attn" in mods else ()) + (b.mlp_linears if "mlp" in mods else ())
            total += sum(model.get_submodule(n).weight.numel() for n in names)
        return total

    def _plan(self, model: nn.Module, blocks: list[Block], stats: dict | None, hidden: int,
              n_blocks: int) -> list[BlockPlan]:
        """Decide what each block keeps (``n_blocks``: how many blocks the stage prunes in all)."""
        args = self.args
        adaptive = args.structure.startswith("AL")
        do_attn, do_mlp = args.modules in ("attention+mlp", "attention"), args.modules in ("attention+mlp", "mlp")
        attn_units, mlp_by_block, plans = [], {}, []
        for b in blocks:
            plan = BlockPlan(b, list(range(b.num_heads)), list(range(b.num_kv_heads)), list(range(b.intermediate_size)))
            if do_attn:
                a = channel_metric(args, model.get_submodule(b.o).weight, Stats(stats[b.o]) if stats else None)
                if args.square_attention:
                    a = a * a
                plan.attn_scores = standardize(a) if adaptive else a
                attn_units += attention_units(b, plan.attn_scores, args, adaptive, hidden)
            if do_mlp:
                m = channel_metric(args, model.get_submodule(b.mlp_out).weight, Stats(stats[b.mlp_out]) if stats else None)
                plan.mlp_scores = standardize(m) if adaptive else m
                per_channel = (len(b.mlp_in) + 1) * hidden
                mlp_by_block[b.index] = mlp_units(b, plan.mlp_scores, per_channel, args.min_channels or args.align)
            plans.append(plan)
        total = sum(u.params for u in attn_units) + sum(u.params for us in mlp_by_block.values() for u in us)
        kept_attn, kept_channels = self._select(blocks, attn_units, mlp_by_block, total, n_blocks)
        counts = {bi: len(ch) for bi, ch in kept_channels.items()}
        if do_mlp:
            aligned = align_counts([counts[b.index] for b in blocks], args.align,
                                   [args.min_channels or args.align] * len(blocks),
                                   [b.intermediate_size for b in blocks], keep_total=adaptive)
            for b, plan, c in zip(blocks, plans, aligned):
                plan.channels = sorted(plan.mlp_scores.argsort(descending=True, stable=True)[:c].tolist())
        if do_attn:
            for b, plan in zip(blocks, plans):
                units = [u for u in kept_attn if u.block == b.index]
                if args.gqa == "per-group" and b.num_heads > b.num_kv_heads:
                    removed = {h for u in attn_units if u.block == b.index and u not in units for h in u.heads}
                    plan.heads = [h for h in range(b.num_heads) if h not in removed]
                else:
                    plan.heads = sorted(h for u in units for h in u.heads)
                    plan.kv_heads = sorted(k for u in units for k in u.kv_heads)
        return plans

    def _select(self, blocks, attn_units: list[Unit], mlp_by_block: dict, total: int, n_blocks: int):
        """Apply the structure: which attention units and how many channels each block keeps."""
        args, p = self.args, self.args.ratio
        mlp_all = [u for us in mlp_by_block.values() for u in us]
        if args.structure == "AL-AM":
            units = attn_units + mlp_all
            kept = keep_top_by_weight(units, (1 - p) * total)
            kept_attn = [u for i, u in enumerate(units) if i in kept and u.kind == "attn"]
            kept_mlp = [u for i, u in enumerate(units) if i in kept and u.kind == "mlp"]
            return kept_attn, self._by_block(blocks, kept_mlp)
        per_block_units = {b.index: [u for u in attn_units if u.block == b.index] for b in blocks}
        n_units = max((len(us) for us in per_block_units.values()), default=0)
        remove_heads = args.remove_heads if args.remove_heads is not None else int(p * n_units) * n_blocks
        if args.structure == "UL-UM":
            kept_attn = [u for us in per_block_units.values() for u in self._drop_lowest(us, int(p * len(us)))]
            kept_mlp = [u for us in mlp_by_block.values() for u in self._drop_lowest(us, int(p * len(us)))]
            return kept_attn, self._by_block(blocks, kept_mlp)
        if args.structure == "UL-MM":
            kept_attn, kept_mlp = [], []
            for b in blocks:
                us = per_block_units[b.index]
                kept = self._drop_lowest(us, min(remove_heads // n_blocks, len(us)))
                kept_attn += kept
                mlp = mlp_by_block.get(b.index, [])
                layer_total = sum(u.params for u in us) + sum(u.params for u in mlp)
                removed_attn = sum(u.params for u in us) - sum(u.params for u in kept)
                r = int(max(0.0, p * layer_total - removed_attn) / mlp[0].params) if mlp else 0
                kept_mlp += self._drop_lowest(mlp, r)
            return kept_attn, self._by_block(blocks, kept_mlp)
        # AL-MM: exactly remove_heads units and the rest of the budget in channels, both global
        kept_attn = self._drop_lowest(attn_units, remove_heads)
        removed_attn = sum(u.params for u in attn_units) - sum(u.params for u in kept_attn)
        r = int(max(0.0, p * total - removed_attn) / mlp_all[0].params) if mlp_all else 0
        return kept_attn, self._by_block(blocks, self._drop_lowest(mlp_all, r))

    @staticmethod
    def _drop_lowest(units: list[Unit], n: int) -> list[Unit]:
        """Remove the ``n`` lowest-scored units that no floor protects."""
        removable = sorted((u for u in units if not u.forced), key=lambda u: u.score)
        drop = {id(u) for u in removable[:n]}
        return [u for u in units if id(u) not in drop]

    @staticmethod
    def _by_block(blocks, kept_mlp: list[Unit]) -> dict[int, list[int]]:
        out = {b.index: [] for b in blocks}
        for u in kept_mlp:
            out[u.block].append(u.channel)
        return out

    def _apply(self, ctx: RunContext, plan: BlockPlan, stats: dict | None) -> None:
        """Bias compensation from the unsliced weights, then the physical slice."""
        b, model = plan.block, ctx.model
        o_bias = mlp_bias = None
        if self.args.bias_compensation:
            hd = b.head_dim
            removed_heads = sorted(set(range(b.num_heads)) - set(plan.heads))
            if removed_heads:
                cols = head_channels(removed_heads, hd)
                w = model.get_submodule(b.o).weight.data.float()
                o_bias = w[:, cols] @ Stats(stats[b.o]).mean[cols]
            removed = sorted(set(range(b.intermediate_size)) - set(plan.channels))
            if removed:
                w = model.get_submodule(b.mlp_out).weight.data.float()
                mlp_bias = w[:, removed] @ Stats(stats[b.mlp_out]).mean[removed]
        ctx.adapter.slice_block(model, b, plan.heads, plan.kv_heads, plan.channels, o_bias, mlp_bias)

    def _report(self, args, shapes_before: dict, blocks: list[Block], before: int, after: int, source: str,
                seconds: float) -> StageResult:
        rows = []
        for b in blocks:
            nh, nkv, inter = shapes_before[b.index]
            rows.append([b.prefix, f"{b.num_heads}/{nh}", f"{b.num_kv_heads}/{nkv}", f"{b.intermediate_size}/{inter}"])
        metrics = {"method": args.method, "structure": args.structure, "metric": args.metric,
                   "target_ratio": args.ratio, "achieved_ratio": round(1 - after / before, 6),
                   "prunable_params_before": before, "prunable_params_after": after,
                   "align": args.align, "gqa": args.gqa, "modules": args.modules,
                   "bias_compensation": args.bias_compensation, "square_attention": args.square_attention,
                   "statistics": source, "seconds": round(seconds, 3),
                   "layers": [{"block": b.index, "heads": b.num_heads, "kv_heads": b.num_kv_heads,
                               "mlp_channels": b.intermediate_size} for b in blocks]}
        return StageResult(metrics, [Table("Kept per layer", ["block", "heads", "KV heads", "MLP channels"], rows)])
