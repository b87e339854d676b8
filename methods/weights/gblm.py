"""GBLM-Pruner: gradient-based language-model pruning (arXiv 2311.04902; docs/methods/weight-pruning.md §5).

Recipe: ``{type: prune_weights, method: gblm, sparsity: 0.5, gradient_norm: l1}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import CRITERIA, WeightArgs
from .wanda import Wanda


@CRITERIA.register
class GBLM(Wanda):
    """Wanda's score + |W_ij| * G_ij, G = scale * ||g_ij||_p over the calibration samples.

    The gradients are of the model as calibrated (dense), the activations sequential, as the paper does.
    """

    name = "gblm"
    needs_gradients = True
    row_scores = False  # its gradients are the whole weight's

    class Args(WeightArgs):
        method: Literal["gblm"]
        gradient_norm: Literal["l2", "l1"] | None = None  # None: l2, assumed the paper's (§5.3)
        gradient_scale: float | None = Field(default=None, gt=0)  # None: 100, the reference's alpha (§5.1)

    def score(self, name, weight, stats):
        g = self.gradients[name]
        scale = self.args.gradient_scale or 100.0
        if (self.args.gradient_norm or "l2") == "l2":
            grad = scale * g["grad_sum_sq"].sqrt()
        else:
            grad = scale * g["grad_sum_abs"]
        return super().score(name, weight, stats) + weight.abs() * grad
