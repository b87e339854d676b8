"""SmoothQuant stage: fold smoothing scales into every pre-norm and the Linears reading only its
output (methods/quant/smoothquant.py; docs/methods/quantization.md §4).

max|X_j| is the calibrate stage's dense ``abs_max`` (padding masked). o_proj and down_proj have no
preceding norm and stay unsmoothed, as in the paper. Post-norm families (BERT) have no such norm:
their norm output is also the residual stream, so folding 1/s into it would change the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from calibration.collectors import Stats
from core.errors import RecipeError, StageFailed
from methods.quant.smoothquant import fold, outlier_ratio, smoothing_scales

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext


class SmoothQuantArgs(StageArgs):
    type: Literal["smoothquant"]
    alpha: float = Field(default=0.5, ge=0, le=1)


class SmoothQuant(Stage):
    type = "smoothquant"
    Args = SmoothQuantArgs
    changes_model = True
    offloads = True

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
        groups = ctx.adapter.smoothing_groups(ctx.model)
        for block in ctx.adapter.blocks(ctx.model):  # block by block: each in memory meanwhile (ctx.held)
            with ctx.held(block.prefix, write=True):
                for norm_name, names in groups:
                    if norm_name.startswith(f"{block.prefix}."):
                        rows.append(self._smooth(ctx, norm_name, names, ratios))
        metrics = {"alpha": self.args.alpha, "groups": len(rows),
                   "outlier_ratio_before": round(max(r[0] for r in ratios), 2),
                   "outlier_ratio_after": round(max(r[1] for r in ratios), 2)}
        return StageResult(metrics, [Table(
            "Smoothing per norm (outlier ratio = max / mean of the per-channel max|x|)",
            ["norm", "linears", "max|x| before", "max|x| after", "outlier ratio before", "after",
             "max|w| before", "max|w| after"], rows)])

    def _smooth(self, ctx: RunContext, norm_name: str, names: tuple[str, ...], ratios: list) -> list:
        """Fold one norm's scales; its table row."""
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
        ratio = outlier_ratio(act), outlier_ratio(act_after)
        ratios.append(ratio)
        return [norm_name, len(names), round(float(act.max()), 3), round(float(act_after.max()), 3),
                round(ratio[0], 2), round(ratio[1], 2), round(w_before, 4),
                round(max(float(lin.weight.detach().abs().max()) for lin in linears), 4)]
