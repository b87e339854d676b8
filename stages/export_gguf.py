"""GGUF export stage: the compressed causal LM as ``model-<type>.gguf`` files for llama.cpp (export/gguf.py).

Each file is loaded back through transformers' GGUF loader and its logits compared with the
PyTorch model's on the export stage's parity inputs; the F16 file is gated by ``rtol``, the
quantized ones are reported (docs/methods/deployment.md, "GGUF for llama.cpp").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from core.errors import RecipeError, StageFailed
from export import gguf

from .base import Stage, StageArgs, StageResult, Table, earlier_stages, export_inputs
from .context import RunContext


class ExportGgufArgs(StageArgs):
    type: Literal["export_gguf"]
    formats: list[gguf.GgufType] = Field(default=["f16"], min_length=1)
    rtol: float = Field(default=1e-2, gt=0)  # F16 file: largest logit error / largest logit

    @field_validator("formats")
    @classmethod
    def _unique(cls, formats):
        if len(set(formats)) != len(formats):
            raise ValueError("each format once: every one writes model-<format>.gguf")
        return formats


class ExportGguf(Stage):
    type = "export_gguf"
    Args = ExportGgufArgs
    cpu_only = True
    settings = ("export",)  # the parity inputs come from the export section's shapes
    after_model_changes = True

    @classmethod
    def describe(cls, args):
        return f"GGUF {', '.join(args.formats)}"

    def validate(self, recipe, model, adapter, field):
        if recipe.model.task != "causal-lm":
            raise RecipeError(f"GGUF export is for causal LMs, not task {recipe.model.task!r}", field="model.task")
        gguf.check_model(model, adapter, f"{field}.type")
        for j, earlier in earlier_stages(recipe, self.args):
            reason = earlier.shape_spread(model, adapter)
            if reason:
                raise RecipeError(f"GGUF's llama architecture needs every layer the same shape, and stages[{j}] "
                                  f"({earlier.type}) can leave them different: {reason}", field=f"stages[{j}]")

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        here = f"stages[{ctx.stage_index}]"
        gguf.check_model(ctx.model, ctx.adapter, f"{here}.type")
        batches = [inputs[0] for inputs in export_inputs(ctx)]
        files, rows = {}, []
        for kind in self.args.formats:
            path = ctx.workdir / f"model-{kind}.gguf"
            ctx.events.log(f"writing {path.name}")
            written = gguf.write(ctx.model, ctx.preprocessor, ctx.adapter, path, kind, ctx.recipe.name)
            check = gguf.compare(ctx.model, gguf.load_back(path), batches)
            files[kind] = {"path": path.name, "bytes": written.bytes, "tensor_types": written.tensor_types,
                           "check": {k: round(v, 6) for k, v in check.items()}}
            rows.append([path.name, written.bytes, f"{check['max_abs_err']:.3g}", f"{check['max_rel_err']:.3g}",
                         f"{check['top1_agreement']:.4f}", f"{check['mean_kl']:.3g}"])
        metrics = {"files": files, "rtol": self.args.rtol, "check": "transformers GGUF loader, export parity inputs"}
        if "f16" in files and files["f16"]["check"]["max_rel_err"] > self.args.rtol:
            raise StageFailed(f"model-f16.gguf loads back with logits off by {files['f16']['check']['max_rel_err']:.3g} "
                              f"of the largest logit, over rtol {self.args.rtol:g}", field=f"{here}.rtol")
        return StageResult(metrics, [Table("GGUF files, loaded back through transformers",
                                           ["file", "bytes", "max abs err", "max rel err", "top-1 agreement",
                                            "mean KL"], rows)])
