"""AWQ stage: activation-aware scales searched block by block on calibration data and folded into the
model before export, for the int4 weight-only format of a later quantize stage
(methods/quant/awq.py; docs/methods/recovery.md, "AWQ").

Blocks run in order through the layer-wise engine, each on the outputs of the blocks before it as
already scaled (the folds keep the float function, so these are the float activations). The search
computes in fp32 whatever ``calibration.dtype`` says: it compares rounding errors of the weights. The
recipe rules make the next quantize stage use the group size the scales were searched for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from calibration.layerwise import LayerwiseEngine
from core.errors import StageFailed
from methods.quant.awq import fold, scale_groups, search_block
from models.adapters import Block, linear

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext


class AwqArgs(StageArgs):
    type: Literal["awq"]
    group_size: int = Field(default=128, ge=16, le=4096)  # the int4 format's bounds
    grid: int = Field(default=20, ge=1, le=100)  # alphas tried: 0, 1/grid, ..., (grid - 1)/grid


class Awq(Stage):
    type = "awq"
    Args = AwqArgs
    changes_model = True
    offloads = True

    @classmethod
    def needs_calibration(cls, args):
        return "data"

    @classmethod
    def describe(cls, args):
        return f"int4 group {args.group_size}, {args.grid} alphas"

    @classmethod
    def tuned_for_grid(cls, args):
        return ("int4",), args.group_size

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        if ctx.calibration is None:
            raise StageFailed("no calibration batches: a calibrate stage must run first", field=f"stages[{ctx.stage_index}]")
        t0 = time.perf_counter()
        rows: list[list] = []
        skipped: set[str] = set()

        def on_block(block: Block, inputs) -> None:
            groups, skip = scale_groups(ctx.adapter, ctx.model, block)
            skipped.update(skip)
            modules = {n: linear(ctx.model, n) for g in groups for n in g.linears}
            for r in search_block(block.module, inputs, groups, modules, self.args.group_size, self.args.grid):
                fold(ctx.model, r.group, r.scales, ctx.adapter.norm_offset)
                rtn, best = r.losses[0], min(r.losses)
                rows.append([block.index, r.group.name, len(r.group.linears), r.alpha, f"{rtn:.4g}", f"{best:.4g}",
                             round(best / rtn, 4) if rtn else 1.0])

        # the search runs the block itself: in fp32, or in calibration.dtype, which an offloaded block is read in
        dtype = ctx.offload.dtype if ctx.offload else torch.float32
        LayerwiseEngine(ctx.model, ctx.adapter, ctx.calibration, dtype, ctx.events, ctx.offload).run_blocks(on_block)
        ratios = [r[-1] for r in rows]
        metrics = {"group_size": self.args.group_size, "groups": len(rows),
                   "mean_loss_ratio": round(sum(ratios) / max(len(ratios), 1), 4),
                   "skipped_folds": sorted(skipped), "seconds": round(time.perf_counter() - t0, 3)}
        return StageResult(metrics, [Table(
            "Scales per group (block-output MSE with the group's Linears on the int4 grid; alpha 0 = round-to-nearest)",
            ["block", "group", "linears", "alpha", "MSE alpha 0", "MSE best", "ratio"], rows)])
