"""Weight pruning: magnitude, Wanda and GBLM scores; unstructured or N:M masks.

Faithful to docs/methods/weight-pruning.md §3-§6 (propagation §2.2, N:M §6.1):
- magnitude: |W|, one threshold per whole matrix (unstructured) or per M-group (N:M);
- wanda: |W_ij| * sqrt(s_j), s_j = ||X_j||^2 / N, compared within each output row;
- gblm: |W_ij| * sqrt(s_j) + |W_ij| * G_ij with G = scale * ||g_ij||_p over calibration samples
  (gradients of the model as calibrated, i.e. dense; activations sequential, as the paper does).

"N:M" follows NVIDIA's convention: at most N non-zeros in every M consecutive weights along the
input dimension (2:4 = 50%, what Ampere/Orin sparse tensor cores run).
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from calibration.cache import cache_key, state_digest
from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from core.errors import RecipeError
from export.gate import LayerSparsity
from core.targets import select
from tasks import TASKS

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext

_PATTERN = re.compile(r"^(unstructured|(\d+):(\d+))$")


class PruneWeightsArgs(StageArgs):
    type: Literal["prune_weights"]
    method: Literal["magnitude", "wanda", "gblm"]
    sparsity: float | None = Field(default=None, gt=0, lt=1)
    pattern: str = "unstructured"
    targets: list[str] = ["re:.*"]
    ignore: list[str] = []
    propagation: Literal["sequential", "dense"] = "sequential"
    gradient_norm: Literal["l2", "l1"] | None = None
    gradient_scale: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        m = _PATTERN.match(self.pattern)
        if not m:
            raise ValueError(f"pattern {self.pattern!r} is not allowed: use 'unstructured' or 'N:M' such as '2:4'")
        if m.group(2):
            n, mm = int(m.group(2)), int(m.group(3))
            if not 0 < n < mm:
                raise ValueError(f"pattern {self.pattern!r}: N:M keeps N of every M weights, so 0 < N < M is required")
            if self.sparsity is not None and abs(self.sparsity - (1 - n / mm)) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                                 f"(which means sparsity {1 - n / mm:g}); drop 'sparsity'")
        elif self.sparsity is None:
            raise ValueError("unstructured pruning needs 'sparsity' (the fraction removed, 0 < s < 1)")
        if self.method != "gblm" and (self.gradient_norm or self.gradient_scale):
            raise ValueError("gradient_norm and gradient_scale only apply to method 'gblm'")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        m = _PATTERN.match(self.pattern)
        return (int(m.group(2)), int(m.group(3))) if m.group(2) else None

    @property
    def target_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity


# ---------------------------------------------------------------------------------------------
# Masks: which entries to zero, given a score (low score = pruned). Stable sorts, so ties break
# by position exactly as the reference implementations do.


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(C_in * s) lowest scores of every output row (Wanda's comparison group)."""
    k = int(score.shape[1] * sparsity)
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(numel * s) lowest scores of the whole matrix (the magnitude baseline)."""
    k = int(score.numel() * sparsity)
    idx = torch.sort(score.flatten(), stable=True).indices[:k]
    return torch.zeros(score.numel(), dtype=torch.bool).scatter_(0, idx, True).view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of M consecutive input columns of each row, prune the M - N lowest scores."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Methods: one class each, a score from the weight and the statistics.


class Method(ABC):
    needs_activations: ClassVar[bool] = True
    matrix_group: ClassVar[bool] = False  # unstructured comparison over the whole matrix

    def __init__(self, args: PruneWeightsArgs, gradients: dict | None):
        self.args, self.gradients = args, gradients

    @abstractmethod
    def score(self, name: str, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Importance of every weight (same shape as ``weight``); the lowest are pruned."""

    def mask(self, name: str, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        score = self.score(name, weight.float(), stats)
        if self.args.nm:
            return nm_mask(score, *self.args.nm)
        return (matrix_mask if self.matrix_group else row_mask)(score, self.args.sparsity)


class Magnitude(Method):
    needs_activations = False
    matrix_group = True

    def score(self, name, weight, stats):
        return weight.abs()


class Wanda(Method):
    def score(self, name, weight, stats):
        return weight.abs() * stats.sq_norm.sqrt().unsqueeze(0)


class GBLM(Wanda):
    def score(self, name, weight, stats):
        g = self.gradients[name]
        scale = self.args.gradient_scale or 100.0
        if (self.args.gradient_norm or "l2") == "l2":
            grad = scale * g["grad_sum_sq"].sqrt()
        else:
            grad = scale * g["grad_sum_abs"]
        return super().score(name, weight, stats) + weight.abs() * grad


METHODS: dict[str, type[Method]] = {"magnitude": Magnitude, "wanda": Wanda, "gblm": GBLM}


class PruneWeights(Stage):
    type = "prune_weights"
    Args = PruneWeightsArgs
    changes_model = True

    @classmethod
    def needs_calibration(cls, args):
        if args.method == "gblm" or (args.method == "wanda" and args.propagation == "dense"):
            return "dense-statistics"
        return "data" if args.method == "wanda" else False

    @classmethod
    def statistics(cls, args):
        kinds = {"gradients"} if args.method == "gblm" else set()
        if args.method != "magnitude" and args.propagation == "dense":
            kinds.add("sq_norm")
        return kinds

    @classmethod
    def describe(cls, args):
        return f"{args.method} {args.pattern}" + (f" {args.sparsity:g}" if args.sparsity and not args.nm else "")

    def validate(self, recipe, model, adapter, field):
        chosen = self._targets(model, adapter, field)
        if self.args.method == "gblm":
            TASKS[recipe.model.task].check_gradients(f"{field}.method")
        if self.args.nm:
            m = self.args.nm[1]
            bad = [n for n, mod in chosen.items() if mod.in_features % m]
            if bad:
                raise RecipeError(f"{len(bad)} targeted layers have an input width not divisible by {m} "
                                  f"(e.g. {bad[0]}); add them to 'ignore'", field=f"{field}.pattern")

    def _targets(self, model: nn.Module, adapter, field: str) -> dict[str, nn.Module]:
        candidates = {name: model.get_submodule(name) for b in adapter.blocks(model) for name in b.linears}
        return select(candidates, self.args.targets, self.args.ignore, field)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        args = self.args
        chosen = self._targets(ctx.model, ctx.adapter, "stages")
        method = METHODS[args.method](args, ctx.statistics.gradients)
        t0 = time.perf_counter()
        info: dict = {"statistics": "none (magnitude)"}

        def prune(names, stats: dict | None):
            for name in names:
                module = ctx.model.get_submodule(name)
                with torch.no_grad():
                    mask = method.mask(name, module.weight.data, Stats(stats[name]) if stats else None)
                    module.weight.data[mask] = 0

        if not method.needs_activations:
            prune(chosen, None)
        elif args.propagation == "dense":
            info = {"statistics": "dense, from the calibrate stage"}
            prune(chosen, ctx.statistics.dense)
        else:
            info = self._sequential(ctx, chosen, prune)
        seconds = time.perf_counter() - t0
        return self._report(ctx, chosen, seconds, info)

    def _sequential(self, ctx: RunContext, chosen: dict[str, nn.Module], prune) -> dict:
        """Wanda's protocol: statistics of block l see blocks < l already pruned; cached on disk."""
        args, spec = self.args, ctx.recipe.calibration
        key = cache_key(kind="sequential", model=state_digest(ctx.model), data=ctx.calibration.sha256,
                        dtype=spec.dtype, method=args.method, pattern=args.pattern, sparsity=args.target_sparsity,
                        targets=sorted(chosen), gradients=ctx.statistics.gradients_key if args.method == "gblm" else None,
                        gradient_norm=args.gradient_norm, gradient_scale=args.gradient_scale)
        cached = ctx.cache.load(key)
        if cached is not None:
            prune(chosen, cached)
            return {"statistics": "sequential", "cache": "hit"}
        by_block: dict[int, dict[str, nn.Module]] = {}
        for block in ctx.adapter.blocks(ctx.model):
            hit = {n: chosen[n] for n in block.linears if n in chosen}
            if hit:
                by_block[block.index] = hit
        engine = LayerwiseEngine(ctx.model, ctx.adapter, ctx.calibration, getattr(torch, spec.dtype), ctx.events)
        stats = engine.run(by_block, {"sq_norm"}, "sequential", on_block=lambda block, s: prune(s, s))
        ctx.cache.save(key, stats)
        return {"statistics": "sequential", "cache": "miss", "compute_dtype": spec.dtype}

    def _report(self, ctx: RunContext, chosen: dict[str, nn.Module], seconds: float, info: dict) -> StageResult:
        rows, zeros, total = [], 0, 0
        for name, module in chosen.items():
            w = module.weight.data
            z = int((w == 0).sum())
            zeros, total = zeros + z, total + w.numel()
            rows.append([name, "x".join(map(str, w.shape)), round(z / w.numel(), 4)])
            ctx.sparsity[name] = LayerSparsity(self.args.pattern, z / w.numel())
        overall = zeros / total
        metrics = {"method": self.args.method, "pattern": self.args.pattern,
                   "target_sparsity": round(self.args.target_sparsity, 6), "achieved_sparsity": round(overall, 6),
                   "layers": len(chosen), "pruned_weights": zeros, "targeted_weights": total,
                   "seconds_pruning": round(seconds, 3), **info}
        return StageResult(metrics, [Table("Sparsity per layer", ["layer", "shape", "sparsity"], rows)])
