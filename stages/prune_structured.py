"""Structured pruning: FLAP and the -sp baselines remove attention heads / KV groups and MLP channels.

A score of methods/structured rates the input channels of every block's attention and MLP output
projections, methods/structured/allocation.py decides what each block keeps, bias compensation
(methods/structured/bias.py) folds the removed channels' means into the biases, and the adapter
slices the Linears for real (docs/methods/structured-pruning.md). Deviations from the reference are
recorded in the stage metrics: the exact unbiased variance (the reference approximates it), and the
allocation rules listed in methods/structured/allocation.py. On an offloaded model (``model.offload``)
each block is read for its scores, then again to be sliced and staged with its new shapes, one at a time.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from core.errors import RecipeError
from core.registry import stage_args
from core.targets import select
from evaluation import figures
from methods.structured import SCORES, ChannelScore, StructuredArgs
from methods.structured.allocation import BlockPlan, allocate
from methods.structured.bias import compensation
from models.adapters import Block, BlockShape, head_channels
from models.plain import plain_form

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext


class PruneStructuredBase(StageArgs):
    type: Literal["prune_structured"]

    def width_multiples(self, model, adapter):
        """The attention output projection reads kept heads x head_dim channels; the MLP output
        projection keeps a multiple of ``align`` or its full width (allocation.align_counts)."""
        args: StructuredArgs = self  # type: ignore[assignment]  # a score's Args merged with this (stage_args)
        widths = {}
        for b in _blocks(args, model, adapter, "stages"):
            if args.attention:
                widths[b.o] = b.head_dim
            if args.mlp:
                widths[b.mlp_out] = math.gcd(args.align, b.intermediate_size)
        return widths

    def shape_spread(self, model, adapter):
        spread = _spread(self, model, adapter)  # type: ignore[arg-type]
        return spread[1] if spread else None


class PruneStructured(Stage):
    type = "prune_structured"
    Args = stage_args(SCORES, PruneStructuredBase)
    changes_model = True
    offloads = True

    @classmethod
    def needs_calibration(cls, args):
        score = SCORES[args.method](args)
        if score.calibrates_sequentially():
            return "data"
        return "dense-statistics" if score.kinds() else False

    @classmethod
    def statistics(cls, args):
        score = SCORES[args.method](args)
        return set() if score.calibrates_sequentially() else score.kinds()

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
        if self.args.plain_checkpoint:
            self._check_plain(model, adapter, field)

    def _check_plain(self, model: nn.Module, adapter, field: str) -> None:
        """Refuse, before any work, what would keep the result from being an ordinary transformers
        checkpoint: per-layer sizes (an AL structure, or blocks left out), sizes the family's config
        cannot state, or a compensation bias it cannot state. The last two are found by pruning a
        meta-device copy of every block by one unit and asking models/plain.py."""
        args = self.args
        spread = _spread(args, model, adapter)
        if spread:
            raise RecipeError(f"plain_checkpoint needs every layer pruned alike, and {spread[1]}",
                              field=f"{field}.{spread[0]}")
        sized = plain_form(_probe(model, adapter, args, biases=False), adapter)
        if not sized.plain:
            fix = "prune MLP channels only (modules: mlp)" if args.attention and sized.blocker == "sizes" else \
                "set plain_checkpoint: false"
            raise RecipeError(f"plain_checkpoint: {sized.reason}; {fix}", field=f"{field}.plain_checkpoint")
        biased = plain_form(_probe(model, adapter, args, biases=args.bias_compensation), adapter)
        if not biased.plain:
            raise RecipeError(f"plain_checkpoint: {biased.reason}, and bias compensation adds one: set "
                              "bias_compensation: false (or plain_checkpoint: false to keep it in a checkpoint only "
                              "tasks.load_checkpoint reads)", field=f"{field}.bias_compensation")

    def _blocks(self, model: nn.Module, adapter, field: str) -> list[Block]:
        return _blocks(self.args, model, adapter, field)

    @torch.no_grad()
    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        score = SCORES[self.args.method](self.args)
        t0 = time.perf_counter()
        blocks = self._blocks(ctx.model, ctx.adapter, "stages")
        before = self._prunable(ctx.model, blocks)
        shapes_before = {b.index: (b.num_heads, b.num_kv_heads, b.intermediate_size) for b in blocks}
        if score.calibrates_sequentially():
            engine = LayerwiseEngine(ctx.model, ctx.adapter, ctx.calibration,
                                     getattr(torch, ctx.recipe.calibration.dtype), ctx.events, ctx.offload)
            targets = {b.index: {n: ctx.model.get_submodule(n) for n in (b.o, b.mlp_out)} for b in blocks}

            def prune_now(block, stats):  # the engine holds the block (and stages it, when offloaded)
                plan = self._plan(ctx, [block], stats, len(blocks), held=True)[0]
                self._apply(ctx, plan, stats)

            engine.run(targets, score.kinds(), "sequential", on_block=prune_now)
            source = "sequential"
        else:
            stats = ctx.statistics.dense if score.kinds() else None
            for plan in self._plan(ctx, blocks, stats, len(blocks)):
                with ctx.held(plan.block.prefix, write=True):  # read, sliced, staged with its new shapes
                    self._apply(ctx, plan, stats)
            source = "dense, from the calibrate stage" if stats else "none (weights only)"
        after_blocks = [b for b in ctx.adapter.blocks(ctx.model) if b.index in shapes_before]
        after = self._prunable(ctx.model, after_blocks)
        form = plain_form(ctx.model, ctx.adapter)
        checkpoint = "plain transformers" if form.plain else f"tasks.load_checkpoint only: {form.reason}"
        result = self._report(score, shapes_before, after_blocks, before, after, source, checkpoint,
                              time.perf_counter() - t0)
        result.metrics["plots"] = figures.kept_per_layer(folder, ctx.workdir, result.metrics["layers"])
        return result

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        """An offloaded model's skeleton takes the shapes of the reused checkpoint it now reads (the stage
        record's kept units); in memory the runner loads that checkpoint itself."""
        if not ctx.offload:
            return
        layers = {layer["block"]: layer for layer in result.metrics["layers"]}
        for b in ctx.adapter.blocks(ctx.model):
            if b.index in layers:
                kept = layers[b.index]
                ctx.adapter.reshape_block(ctx.model, b, _shape(ctx.adapter.shape(ctx.model, b), b, kept["heads"],
                                                               kept["kv_heads"], kept["mlp_channels"],
                                                               self.args.bias_compensation))

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

    def _plan(self, ctx: RunContext, blocks: list[Block], stats: dict | None, n_blocks: int,
              held: bool = False) -> list[BlockPlan]:
        """Score the output projections' input channels, then allocate (``n_blocks``: blocks pruned in all).
        An offloaded block is read for its scores unless ``held`` (the caller holds it); the scores are small."""
        args, score, model = self.args, SCORES[self.args.method](self.args), ctx.model
        attn, mlp = {}, {}
        for b in blocks:
            with contextlib.nullcontext() if held else ctx.held(b.prefix, write=False):
                if args.attention:
                    attn[b.index] = score.attention(model.get_submodule(b.o).weight, _stats(stats, b.o))
                if args.mlp:
                    mlp[b.index] = score.mlp(model.get_submodule(b.mlp_out).weight, _stats(stats, b.mlp_out))
        return allocate(args, blocks, attn, mlp, self._hidden(model, blocks[0]), n_blocks)

    def _apply(self, ctx: RunContext, plan: BlockPlan, stats: dict | None) -> None:
        """Bias compensation from the unsliced weights, then the physical slice."""
        b, model = plan.block, ctx.model
        o_bias = mlp_bias = None
        if self.args.bias_compensation:
            removed_heads, removed = plan.removed_heads(), plan.removed_channels()
            if removed_heads:
                cols = head_channels(removed_heads, b.head_dim)
                o_bias = compensation(model.get_submodule(b.o).weight.data, cols, Stats(stats[b.o]).mean)
            if removed:
                mlp_bias = compensation(model.get_submodule(b.mlp_out).weight.data, removed,
                                        Stats(stats[b.mlp_out]).mean)
        ctx.adapter.slice_block(model, b, plan.heads, plan.kv_heads, plan.channels, o_bias, mlp_bias)

    def _report(self, score: ChannelScore, shapes_before: dict, blocks: list[Block], before: int, after: int,
                source: str, checkpoint: str, seconds: float) -> StageResult:
        args, rows = self.args, []
        for b in blocks:
            nh, nkv, inter = shapes_before[b.index]
            rows.append([b.prefix, f"{b.num_heads}/{nh}", f"{b.num_kv_heads}/{nkv}", f"{b.intermediate_size}/{inter}"])
        metrics = {"method": args.method, "structure": args.structure, "metric": score.metric,
                   "target_ratio": args.ratio, "achieved_ratio": round(1 - after / before, 6),
                   "prunable_params_before": before, "prunable_params_after": after,
                   "align": args.align, "gqa": args.gqa, "modules": args.modules,
                   "bias_compensation": args.bias_compensation, "square_attention": args.square_attention,
                   "statistics": source, "seconds": round(seconds, 3), "checkpoint": checkpoint,
                   "layers": [{"block": b.index, "heads": b.num_heads, "kv_heads": b.num_kv_heads,
                               "mlp_channels": b.intermediate_size, "heads_before": shapes_before[b.index][0],
                               "kv_heads_before": shapes_before[b.index][1],
                               "mlp_channels_before": shapes_before[b.index][2]} for b in blocks]}
        return StageResult(metrics, [Table("Kept per layer", ["block", "heads", "KV heads", "MLP channels"], rows)])


def _blocks(args, model: nn.Module, adapter, field: str) -> list[Block]:
    blocks = adapter.blocks(model)
    chosen = select({b.prefix: b.module for b in blocks}, args.targets, args.ignore, field)
    return [b for b in blocks if b.prefix in chosen]


def _spread(args, model: nn.Module, adapter) -> tuple[str, str] | None:
    """(field, why and the fix) when the blocks may differ in shape after this prune, else None."""
    if args.adaptive:
        return "structure", f"structure {args.structure} gives each layer its own sizes: use structure UL-UM or UL-MM"
    if len(_blocks(args, model, adapter, "stages")) != len(adapter.blocks(model)):
        return "targets", "targets/ignore leave some blocks unpruned: remove targets and ignore"
    return None


def _probe(model: nn.Module, adapter, args, biases: bool) -> nn.Module:
    """A meta-device copy of ``model`` with every block one unit smaller, as ``args`` would prune it
    (one KV group, or one query head per group; ``align`` MLP channels), with the compensation
    biases when ``biases``."""
    probe = copy.deepcopy(model)
    for b in adapter.blocks(probe):
        heads, kv, inter = b.num_heads, b.num_kv_heads, b.intermediate_size
        if args.attention and args.gqa == "per-group" and heads > kv:
            heads -= kv
        elif args.attention and kv > 1:
            heads, kv = heads - heads // kv, kv - 1
        if args.mlp and inter > args.align:
            inter -= args.align
        adapter.reshape_block(probe, b, _shape(adapter.shape(probe, b), b, heads, kv, inter, biases))
    return probe


def _shape(before: BlockShape, b: Block, heads: int, kv: int, inter: int, biases: bool) -> BlockShape:
    """Block ``b`` (of shape ``before``) pruned to these sizes; bias compensation (``biases``) gives an output
    projection whose inputs lost units a bias."""
    return BlockShape(heads, kv, inter, before.o_bias or (biases and heads < b.num_heads),
                      before.mlp_out_bias or (biases and inter < b.intermediate_size))


def _stats(stats: dict | None, name: str) -> Stats | None:
    return Stats(stats[name]) if stats else None
