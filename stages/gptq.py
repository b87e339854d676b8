"""GPTQ stage: the targeted block Linears rounded to the integer grid of the later quantize stage,
with error compensation, on calibration data (methods/quant/gptq.py; docs/methods/recovery.md, "GPTQ").

Blocks run in order through the layer-wise engine (sequential propagation, the paper's protocol):
a block's Hessians are collected on the outputs of the blocks before it as already rounded, its
Linears are rounded, and its rounded outputs feed the next block. The weights leave the stage
exactly on the grid; their scales go to the quantize stage through ``RunContext.weight_scales`` (and
``scales.safetensors`` in the stage folder, for --resume), so the graph stores the very integers
chosen here. The recipe rules tie ``bits``/``group_size`` to the quantize stage's format and refuse
any stage that changes the model in between; the plan refuses a Linear rounded here that the
quantize stage would keep float.

Recipe: ``- {type: gptq, bits: 4, group_size: 128}`` before export and ``- {type: quantize, format:
int4, group_size: 128}`` after it; ``bits: 8`` (per output channel) before ``w8a16`` or ``int8``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from core.errors import StageFailed
from core.targets import select
from methods.quant.gptq import gptq, output_error
from methods.quant.grid import Grid

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext

SCALES = "scales.safetensors"
ERROR_ROWS = 512  # output rows the error table is measured on


def sample_rows(n: int) -> torch.Tensor:
    """At most ERROR_ROWS evenly spaced output rows: round-to-nearest's error over all rows is 2 N K^2
    flops, four times GPTQ's own work (9 s at a 3B model's down_proj, 1 thread), for a diagnostic a
    sample estimates (rows are independent; GPTQ's own per-row errors come free from its walk)."""
    return torch.linspace(0, n - 1, min(ERROR_ROWS, n)).round().long().unique()


class GptqArgs(StageArgs):
    type: Literal["gptq"]
    bits: Literal[4, 8] = 4  # 4: the int4 format's groups; 8: one scale per output channel (w8a16, int8)
    group_size: int | None = Field(default=None, ge=16, le=4096)  # bits 4 only; 128 when not given
    dampening: float = Field(default=0.01, gt=0, le=1)  # of mean(diag H), added to the diagonal
    act_order: bool = False  # columns by decreasing diag H, group scales fixed up front
    blocksize: int = Field(default=128, ge=1, le=8192)
    targets: list[str] = ["re:.*"]
    ignore: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _int4_groups_of_128(cls, data):
        if isinstance(data, dict) and data.get("bits", 4) == 4 and "group_size" not in data:
            return {**data, "group_size": 128}
        return data

    @model_validator(mode="after")
    def _grid(self):
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("bits 8 rounds with one scale per output channel (the w8a16 and int8 formats): "
                             "remove 'group_size'")
        if self.bits == 4 and self.group_size is None:
            raise ValueError("bits 4 rounds in groups along the input (the int4 format): set 'group_size'")
        if self.group_size and not self.act_order and self.blocksize % self.group_size:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of group_size {self.group_size} "
                             "(or set act_order: true), so a group's scale is taken from fully updated weights")
        return self


class Gptq(Stage):
    type = "gptq"
    Args = GptqArgs
    changes_model = True
    keeps_grid = True
    offloads = True

    @classmethod
    def needs_calibration(cls, args):
        return "data"

    @classmethod
    def describe(cls, args):
        grid = f"int4 group {args.group_size}" if args.bits == 4 else "int8 per output channel"
        return grid + (", act_order" if args.act_order else "")

    @classmethod
    def tuned_for_grid(cls, args):
        return (("int4",), args.group_size) if args.bits == 4 else (("w8a16", "int8"), None)

    def validate(self, recipe, model, adapter, field):
        self._targets(model, adapter, field)

    def grid_layers(self, model, adapter, field):
        return set(self._targets(model, adapter, field))

    def _targets(self, model, adapter, field: str) -> dict:
        candidates = {name: model.get_submodule(name) for b in adapter.blocks(model) for name in b.linears}
        return select(candidates, self.args.targets, self.args.ignore, field)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        where = f"stages[{ctx.stage_index}]"
        if ctx.calibration is None:
            raise StageFailed("no calibration batches: a calibrate stage must run first", field=where)
        args, t0 = self.args, time.perf_counter()
        chosen = self._targets(ctx.model, ctx.adapter, where)
        by_block = {b.index: {n: chosen[n] for n in b.linears if n in chosen} for b in ctx.adapter.blocks(ctx.model)}
        scales: dict[str, torch.Tensor] = {}  # the block being rounded's; earlier blocks' are in spilled/
        spilled = folder / "scales-by-block"
        shutil.rmtree(spilled, ignore_errors=True)  # an interrupted attempt's
        spilled.mkdir()
        rows: list[list] = []

        def spill() -> None:
            """The rounded block's scales to a file of their own: held to the end they grew 3.1 MiB per
            block of a 3B model (87 MiB, half a block, by its last; 2 GiB at 70B)."""
            if scales:
                save_file(dict(scales), str(spilled / f"{len(list(spilled.iterdir())):05d}.safetensors"))
                scales.clear()

        def on_block(block, stats: dict[str, dict[str, torch.Tensor]]) -> None:
            if scales and not next(iter(scales)).startswith(f"{block.prefix}."):
                spill()
            for name in list(stats):  # popped: a Hessian is freed once the last Linear sharing it is rounded
                weight = ctx.model.get_submodule(name).weight
                entry = Stats(stats.pop(name))
                shared = any(other["xtx"] is entry.t["xtx"] for other in stats.values())  # q/k/v, gate/up
                hessian = entry.hessian if shared else entry.hessian_()
                del entry
                picked = sample_rows(weight.shape[0])
                sample = weight.data[picked]
                rtn = output_error(sample, Grid(args.bits, args.group_size).nearest(sample), hessian)
                try:  # rounds the weight in place and consumes the Hessian: its memory becomes the factor
                    r = gptq(weight.data, hessian, args.bits, args.group_size, args.dampening, args.act_order,
                             args.blocksize, name)
                except ValueError as e:
                    raise StageFailed(str(e), field=f"{where}.dampening") from e
                del hessian  # the factor's memory, freed before the next Linear's
                loss = float(r.row_error[picked].sum())
                scales[name] = r.scales.cpu()  # the quantize stage writes them into the CPU-side graph
                rows.append([name, "x".join(map(str, weight.shape)), f"{rtn:.4g}", f"{loss:.4g}",
                             round(loss / rtn, 4) if rtn else 1.0])

        engine = LayerwiseEngine(ctx.model, ctx.adapter, ctx.calibration, getattr(torch, ctx.recipe.calibration.dtype),
                                 ctx.events, ctx.offload)
        engine.run({i: m for i, m in by_block.items() if m}, {"hessian"}, "sequential", on_block=on_block, keep=False,
                   by_input=True)  # one input's Hessian at a time
        spill()
        ctx.weight_scales = {n: t for path in sorted(spilled.iterdir()) for n, t in load_file(str(path)).items()}
        save_file(ctx.weight_scales, str(folder / SCALES))
        shutil.rmtree(spilled)
        ratios = [r[-1] for r in rows]
        metrics = {"bits": args.bits, "group_size": args.group_size, "act_order": args.act_order, "layers": len(rows),
                   "mean_loss_ratio": round(sum(ratios) / len(ratios), 4), "seconds": round(time.perf_counter() - t0, 3)}
        return StageResult(metrics, [Table(
            f"Per Linear: mean squared output error on the calibration tokens, round-to-nearest vs GPTQ (same grid; "
            f"over at most {ERROR_ROWS} evenly spaced output rows)",
            ["layer", "shape", "RTN", "GPTQ", "ratio"], rows)])

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.weight_scales = load_file(str(folder / SCALES))
