"""Weight pruning: a criterion of methods/weights prunes every weight matrix; unstructured or N:M masks.

The criterion declares what its score reads (activation statistics, gradients) and which of its
arguments the sequential statistics depend on; this stage turns that into calibration needs and a
cache key, collects the statistics (sequentially, as Wanda's protocol, or from the calibrate stage
with dense propagation; docs/methods/weight-pruning.md §2.2) and writes the pruned weights back
(the masked ones zeroed; SparseGPT also updates the kept ones).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from calibration.cache import cache_key
from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from core.errors import RecipeError
from core.registry import stage_args
from core.targets import select
from evaluation import figures
from export.gate import LayerSparsity
from methods.weights import CRITERIA, Criterion
from models.offload import trim_heap
from tasks import TASKS

from .base import Stage, StageArgs, StageResult, Table, check_widths_left
from .context import RunContext


class PruneWeightsBase(StageArgs):
    type: Literal["prune_weights"]


class PruneWeights(Stage):
    type = "prune_weights"
    Args = stage_args(CRITERIA, PruneWeightsBase)
    changes_model = True
    offloads = True

    @classmethod
    def needs_calibration(cls, args):
        criterion = CRITERIA[args.method]
        if criterion.dense_statistics(args):
            return "dense-statistics"
        return "data" if criterion.activations else False

    @classmethod
    def statistics(cls, args):
        return CRITERIA[args.method].dense_statistics(args)

    @classmethod
    def describe(cls, args):
        return f"{args.method} {args.pattern}" + (f" {args.sparsity:g}" if args.sparsity and not args.nm else "")

    def validate(self, recipe, model, adapter, field):
        chosen = self._targets(model, adapter, field)
        if CRITERIA[self.args.method].needs_gradients:
            if recipe.model.offload:
                raise RecipeError(f"{self.args.method} backpropagates through the whole model, which model.offload "
                                  "keeps on disk: use wanda or sparsegpt, or set model.offload: false",
                                  field=f"{field}.method")
            TASKS[recipe.model.task].check_gradients(f"{field}.method")
        if self.args.nm:
            m = self.args.nm[1]
            bad = [n for n, mod in chosen.items() if mod.in_features % m]
            if bad:
                raise RecipeError(f"{len(bad)} targeted layers have an input width not divisible by {m} "
                                  f"(e.g. {bad[0]}); add them to 'ignore'", field=f"{field}.pattern")
            check_widths_left(recipe, self.args, model, adapter, set(chosen), m, self.args.pattern, f"{field}.pattern")

    def _targets(self, model: nn.Module, adapter, field: str) -> dict[str, nn.Module]:
        candidates = {name: model.get_submodule(name) for b in adapter.blocks(model) for name in b.linears}
        return select(candidates, self.args.targets, self.args.ignore, field)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        args = self.args
        chosen = self._targets(ctx.model, ctx.adapter, "stages")
        criterion = CRITERIA[args.method](args, ctx.statistics.gradients)
        t0 = time.perf_counter()
        pruned: dict[str, tuple[str, int, int]] = {}  # name -> (shape, zeros, weights): offloaded weights go away

        def prune(names, stats: dict | None):
            for name in names:
                module = ctx.model.get_submodule(name)
                with torch.no_grad():
                    criterion.prune(name, module.weight.data, Stats(stats[name]) if stats else None)
                w = module.weight.data
                pruned[name] = ("x".join(map(str, w.shape)), w.numel() - int(torch.count_nonzero(w)), w.numel())
            trim_heap()  # a block's freed activations fragment the heap: in memory, +40 MiB resident per block

        if not criterion.activations:
            info: dict = {"statistics": f"none ({args.method})"}
            self._each_block(ctx, chosen, lambda names: prune(names, None))
        elif args.propagation == "dense":
            info = {"statistics": "dense, from the calibrate stage"}
            self._each_block(ctx, chosen, lambda names: prune(names, ctx.statistics.dense))
        else:
            info = self._sequential(ctx, chosen, criterion, prune)
        seconds = time.perf_counter() - t0
        return self._report(ctx, folder, {n: pruned[n] for n in chosen}, seconds, info)

    @staticmethod
    def _each_block(ctx: RunContext, chosen: dict[str, nn.Module], prune) -> None:
        """``prune`` the chosen Linears block by block, each block in memory meanwhile (ctx.held)."""
        for block in ctx.adapter.blocks(ctx.model):
            names = [n for n in block.linears if n in chosen]
            if names:
                with ctx.held(block.prefix, write=True):
                    prune(names)

    def _sequential(self, ctx: RunContext, chosen: dict[str, nn.Module], criterion: Criterion, prune) -> dict:
        """Wanda's protocol: statistics of block l see blocks < l already pruned; cached on disk, except an
        offloaded model's Hessians (SparseGPT): the whole model's are ~10 GB at 3B, so each block's are
        dropped once it is pruned."""
        key = self._sequential_key(ctx, chosen, criterion)
        held = not (ctx.offload and "hessian" in criterion.activations)
        cached = ctx.cache.load(key) if held else None
        if cached is not None:
            self._each_block(ctx, chosen, lambda names: prune(names, cached))
            return {"statistics": "sequential", "cache": "hit"}
        by_block: dict[int, dict[str, nn.Module]] = {}
        for block in ctx.adapter.blocks(ctx.model):
            hit = {n: chosen[n] for n in block.linears if n in chosen}
            if hit:
                by_block[block.index] = hit
        spec = ctx.recipe.calibration
        engine = LayerwiseEngine(ctx.model, ctx.adapter, ctx.calibration, getattr(torch, spec.dtype), ctx.events,
                                 ctx.offload)
        stats = engine.run(by_block, set(criterion.activations), "sequential", on_block=lambda block, s: prune(s, s),
                           keep=held, by_input=not held)  # dropped Hessians: one input's at a time
        if held:
            ctx.cache.save(key, stats)
        return {"statistics": "sequential", "cache": "miss" if held else "off (offloaded Hessians)",
                "compute_dtype": spec.dtype}

    def _sequential_key(self, ctx: RunContext, chosen: dict[str, nn.Module], criterion: Criterion) -> str:
        """Everything the sequential statistics depend on: the dense model and data, and every
        setting of the pruning that shaped upstream activations, the criterion's own ones included."""
        args = self.args
        return cache_key(kind="sequential", model=ctx.model_digest(), data=ctx.calibration.sha256,
                         dtype=ctx.recipe.calibration.dtype, method=args.method, pattern=args.pattern,
                         sparsity=args.target_sparsity, targets=sorted(chosen),
                         gradients=ctx.statistics.gradients_key if criterion.needs_gradients else None,
                         criterion=criterion.cache_fields())

    def _report(self, ctx: RunContext, folder: Path, pruned: dict[str, tuple[str, int, int]], seconds: float,
                info: dict) -> StageResult:
        rows, zeros, total = [], 0, 0
        for name, (shape, z, n) in pruned.items():
            zeros, total = zeros + z, total + n
            rows.append([name, shape, round(z / n, 4)])
            ctx.sparsity[name] = LayerSparsity(self.args.pattern, z / n)
        overall = zeros / total
        metrics = {"method": self.args.method, "pattern": self.args.pattern,
                   "target_sparsity": round(self.args.target_sparsity, 6), "achieved_sparsity": round(overall, 6),
                   "layers": len(pruned), "pruned_weights": zeros, "targeted_weights": total,
                   "seconds_pruning": round(seconds, 3), **info,
                   "plots": figures.sparsity_per_layer(folder, ctx.workdir, {row[0]: row[2] for row in rows})}
        return StageResult(metrics, [Table("Sparsity per layer", ["layer", "shape", "sparsity"], rows)])
