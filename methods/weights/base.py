"""What every weight-pruning criterion shares: its common arguments, the masks, the `Criterion` contract.

docs/methods/weight-pruning.md §2 (propagation), §6 (N:M). A criterion scores every weight of a
Linear (low score = pruned) and declares the data the score reads; the stage collects that data and
turns the scores into masks. "N:M" follows NVIDIA's convention: at most N non-zeros in every M
consecutive weights along the input dimension (2:4 = 50%, what Ampere/Orin sparse tensor cores run).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibration.collectors import Stats
from core.memory import row_slices
from core.registry import Registry

CRITERIA: Registry = Registry("weight criterion", key="method")

_PATTERN = re.compile(r"^(unstructured|(\d+):(\d+))$")


class WeightArgs(BaseModel):
    """The arguments of every criterion; a criterion's own ``Args`` subclass adds its fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str  # each criterion narrows it to Literal[name]; declared here so recipes list it first
    sparsity: float | None = Field(default=None, gt=0, lt=1)
    pattern: str = "unstructured"
    targets: list[str] = ["re:.*"]
    ignore: list[str] = []
    propagation: Literal["sequential", "dense"] = "sequential"

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
# by position exactly as the reference implementations do. Per-row masks sort _SORTED scores at a
# time: a sort's values and int64 indices are 3x the scores' bytes, 288 MiB for a whole 8192 x 3072
# Linear (the peak of an offloaded 3B model's pruning before), 12 MiB per slice.

_SORTED = 2**20


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(C_in * s) lowest scores of every output row (Wanda's comparison group)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for rows in row_slices(score, _SORTED):
        mask[rows].scatter_(1, torch.sort(score[rows], dim=1, stable=True).indices[:, :k], True)
    return mask


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the floor(numel * s) lowest scores of the whole matrix (the magnitude baseline)."""
    k = int(score.numel() * sparsity)
    idx = torch.sort(score.flatten(), stable=True).indices[:k]
    return torch.zeros(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, idx, True).view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of M consecutive input columns of each row, prune the M - N lowest scores."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=score.device)
    for chunk in row_slices(score, _SORTED):
        groups = score[chunk].reshape(-1, cols // m, m)
        mask[chunk].scatter_(2, torch.sort(groups, dim=2, stable=True).indices[..., : m - n], True)
    return mask.reshape(rows, cols)


# ---------------------------------------------------------------------------------------------


class Criterion(ABC):
    """One importance score per weight, and the data it reads; `prune` is what the stage calls.

    Most criteria only score: `prune` zeroes the masked weights in place and keeps the rest. A criterion
    that also moves the kept weights (SparseGPT's error compensation) overrides `prune`.

    The declarations decide what the stage asks of calibration, so a new criterion never edits the
    stage: ``activations`` (input-statistic kinds of calibration/collectors.py; empty = weights
    only), ``needs_gradients`` (per-sample gradient sums of the model as calibrated), and
    ``matrix_group`` (unstructured scores compete over the whole matrix, not within a row) and
    ``row_scores`` (a row's scores read that row of the weight only, beside per-input statistics: the
    weight may be scored a slice of rows at a time).
    """

    name: ClassVar[str]
    Args: ClassVar[type[WeightArgs]]
    activations: ClassVar[frozenset[str]] = frozenset()
    needs_gradients: ClassVar[bool] = False
    matrix_group: ClassVar[bool] = False
    row_scores: ClassVar[bool] = False

    def __init__(self, args: WeightArgs, gradients: dict | None = None):
        self.args, self.gradients = args, gradients  # gradients: Linear name -> its gradient sums

    @classmethod
    def dense_statistics(cls, args: WeightArgs) -> set[str]:
        """What a calibrate stage must collect on the model as calibrated: the gradients, and the
        activation statistics too under dense propagation (sequential ones are collected while pruning)."""
        kinds = set(cls.activations) if args.propagation == "dense" else set()
        return kinds | ({"gradients"} if cls.needs_gradients else set())

    def cache_fields(self) -> dict[str, Any]:
        """The criterion's own arguments. Sequential statistics of block l depend on how blocks < l
        were pruned, so every one of them keys the statistics cache (common ones are keyed by the stage)."""
        return {f: getattr(self.args, f) for f in self.Args.model_fields if f not in WeightArgs.model_fields}

    @abstractmethod
    def score(self, name: str, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Importance of every weight of Linear ``name`` (same shape as ``weight``, fp32); the lowest are pruned."""

    def mask(self, name: str, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """True where the weight is pruned: N of every M kept, or the target fraction per row / matrix.
        Per-row masks of a ``row_scores`` criterion are scored a slice of rows at a time: no fp32 copy
        of the whole weight and no whole score (each 96 MiB for an 8192 x 3072 Linear)."""
        if self.matrix_group and not self.args.nm:
            return matrix_mask(self.score(name, weight.float(), stats), self.args.sparsity)
        mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        for rows in row_slices(weight, _SORTED) if self.row_scores else [slice(None)]:
            score = self.score(name, weight[rows].float(), stats)
            mask[rows] = nm_mask(score, *self.args.nm) if self.args.nm else row_mask(score, self.args.sparsity)
        return mask

    def prune(self, name: str, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Zero the masked entries of ``weight`` in place (no second Linear-sized tensor: 48 MiB at a 3B
        model's MLP in bfloat16) and return the mask."""
        mask = self.mask(name, weight, stats)
        weight.masked_fill_(mask, 0)
        return mask
