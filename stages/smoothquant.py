"""SmoothQuant: migrate activation outliers into the weights before W8A8 (docs/methods/quantization.md §4).

For each pre-norm and the Linears that read only its output (q/k/v; gate/up or fc1), per input
channel j:

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)      (max over the rows of every Linear in the group)

then W' = W diag(s) and the norm's weight (and bias) are divided by s, so the norm emits X / s and
the model computes the same function with no op added. As in the reference implementation
(mit-han-lab/smoothquant ``smooth_ln_fcs``) the weight maxima and the scales are clamped at 1e-5,
which also keeps all-zero (pruned) columns finite; zeros stay zeros. o_proj and down_proj have no
preceding norm and stay unsmoothed, as in the paper. max|X_j| is the calibrate stage's dense
``abs_max`` (padding masked). Post-norm families (BERT) have no such norm: their norm output is
also the residual stream, so folding 1/s into it would change the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from calibration.collectors import Stats
from core.errors import RecipeError, StageFailed

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext

CLAMP = 1e-5


class SmoothQuantArgs(StageArgs):
    type: Literal["smoothquant"]
    alpha: float = Field(default=0.5, ge=0, le=1)


def smoothing_scales(act_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:j|^(1-alpha) over every weight [out, in] of the group."""
    w_max = torch.cat([w.detach().abs().double() for w in weights]).amax(0).clamp_min(CLAMP)
    return (act_abs_max.double().pow(alpha) / w_max.pow(1 - alpha)).clamp_min(CLAMP)


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, offset: float = 0.0) -> None:
    """X' = X / s through the norm's affine parameters, W' = W diag(s): the same function.

    ``offset``: the norm scales by (offset + weight) (Gemma: 1), so that sum is what is divided.
    """
    norm.weight.copy_(((norm.weight.double() + offset) / scales - offset).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() / scales).to(norm.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * scales).to(lin.weight.dtype))


class SmoothQuant(Stage):
    type = "smoothquant"
    Args = SmoothQuantArgs
    changes_model = True

    @classmethod
    def needs_calibration(cls, args):
        return "dense-statistics"

    @classmethod
    def statistics(cls, args):
        return {"abs_max"}

    @classmethod
    def describe(cls, args):
        return f"alpha {args.alpha:g}"

    def validate(self, recipe, model, adapter, field):
        if not adapter.smoothing_groups(model):
            raise RecipeError(f"{adapter.family} blocks are post-norm: there is no norm whose output feeds only the "
                              "Linears, so SmoothQuant cannot fold its scales; drop this stage", field=f"{field}.type")

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        rows, ratios = [], []
        for norm_name, names in ctx.adapter.smoothing_groups(ctx.model):
            norm = ctx.model.get_submodule(norm_name)
            if getattr(norm, "weight", None) is None:
                raise StageFailed(f"{norm_name} has no affine weight to fold the smoothing scales into",
                                  field="stages")
            linears = [ctx.model.get_submodule(n) for n in names]
            act = Stats(ctx.statistics.dense[names[0]]).abs_max
            w_before = max(float(lin.weight.detach().abs().max()) for lin in linears)
            scales = smoothing_scales(act, [lin.weight for lin in linears], self.args.alpha)
            fold(norm, linears, scales, ctx.adapter.norm_offset)
            act_after = act.double() / scales
            ratio = float(act.max() / act.mean().clamp_min(1e-12)), float(act_after.max() / act_after.mean())
            ratios.append(ratio)
            rows.append([norm_name, len(names), round(float(act.max()), 3), round(float(act_after.max()), 3),
                         round(ratio[0], 2), round(ratio[1], 2), round(w_before, 4),
                         round(max(float(lin.weight.detach().abs().max()) for lin in linears), 4)])
        metrics = {"alpha": self.args.alpha, "groups": len(rows),
                   "outlier_ratio_before": round(max(r[0] for r in ratios), 2),
                   "outlier_ratio_after": round(max(r[1] for r in ratios), 2)}
        return StageResult(metrics, [Table(
            "Smoothing per norm (outlier ratio = max / mean of the per-channel max|x|)",
            ["norm", "linears", "max|x| before", "max|x| after", "outlier ratio before", "after",
             "max|w| before", "max|w| after"], rows)])
