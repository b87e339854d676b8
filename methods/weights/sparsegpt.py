"""SparseGPT: one-shot pruning with OBS weight updates (arXiv 2301.00774; docs/methods/weight-pruning.md §10).

Recipe: ``{type: prune_weights, method: sparsegpt, pattern: "2:4"}`` (or ``sparsity: 0.5``;
``blocksize: 128`` and ``dampening: 0.01`` are the paper's defaults).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..obs import fp32_factor, usable_hessian
from .base import CRITERIA, Criterion, WeightArgs, matrix_mask, nm_mask


def saliency(weight: torch.Tensor, factor_diag: torch.Tensor) -> torch.Tensor:
    """OBS error of zeroing each weight: w^2 / [U_jj]^2 (for column 0, [U_00]^2 = [H^-1]_00)."""
    return weight.pow(2) / factor_diag.pow(2).unsqueeze(0)


@CRITERIA.register
class SparseGPT(Criterion):
    """Columns left to right in blocks: choose the mask by OBS saliency, zero, spread the error right.

    The unstructured mask is chosen per block of ``blocksize`` columns over all rows (the paper's
    adaptive mask selection); N:M masks per group of M columns, on the weights as already updated.
    Input channels never seen (diag H = 0) are zeroed, as in the reference.
    """

    name = "sparsegpt"
    activations = frozenset({"hessian"})
    matrix_group = True

    class Args(WeightArgs):
        method: Literal["sparsegpt"]
        blocksize: int = Field(default=128, gt=0)
        dampening: float = Field(default=0.01, gt=0)

        @model_validator(mode="after")
        def _groups_inside_blocks(self):
            if self.nm and self.blocksize % self.nm[1]:
                raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} "
                                 f"(pattern {self.pattern}), so no N:M group straddles two blocks")
            return self

    def score(self, name, weight, stats):
        """The saliency the first column block is masked by, before any update."""
        hessian, _ = usable_hessian(stats.hessian, weight)
        return saliency(weight.float(), fp32_factor(hessian, self.args.dampening, name).diagonal())

    def prune(self, name, weight, stats):
        hessian, dead = usable_hessian(stats.hessian, weight)
        w = weight.float().clone()
        w[:, dead] = 0
        factor = fp32_factor(hessian, self.args.dampening, name)
        mask = torch.zeros_like(w, dtype=torch.bool)
        for start in range(0, w.shape[1], self.args.blocksize):
            end = min(start + self.args.blocksize, w.shape[1])
            block = w[:, start:end].clone()  # contiguous: the column loop runs on it
            errors = self._prune_block(block, mask[:, start:end], factor[start:end, start:end].contiguous())
            w[:, start:end] = block
            w[:, end:] -= errors @ factor[start:end, end:]  # the block's errors, spread to later columns
        mask |= dead.unsqueeze(0)
        weight.copy_(w.masked_fill_(mask, 0))
        return mask

    def _prune_block(self, w: torch.Tensor, mask: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Prune ``w`` (one column block) in place, filling ``mask`` (a view); returns the scaled errors."""
        d = factor.diagonal()
        nm = self.args.nm
        if not nm:
            mask[:] = matrix_mask(saliency(w, d), self.args.sparsity)
        errors = torch.zeros_like(w)
        for i in range(w.shape[1]):
            if nm and i % nm[1] == 0:
                mask[:, i:i + nm[1]] = nm_mask(saliency(w[:, i:i + nm[1]], d[i:i + nm[1]]), *nm)
            errors[:, i] = w[:, i] * mask[:, i] / d[i]  # (w - q) / d, q = w with the masked rows zeroed
            w[:, i:].addr_(errors[:, i], factor[i, i:], alpha=-1)  # column i becomes q; later ones compensate
        return errors
