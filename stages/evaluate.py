"""Evaluate stage: the compressed artifact against the dense model, same data, same runtime, same run.

Quality runs on held-out data that calibration never saw, at the export shapes, through ONNX
Runtime when an export stage came first (so the number describes the file that ships), else
through PyTorch; the task chooses the data and the metrics (tasks/). The dense model is reloaded
from its source and exported at the same shapes. Latency alternates between the two graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from evaluation import figures, generation
from evaluation.dense import dense_onnx
from evaluation.latency import latency, runs
from evaluation.runner import Runner
from evaluation.size import size
from export.onnx import check_runtime
from models.loading import load_model
from tasks import HeldOut

from .base import Stage, StageArgs, StageResult
from .context import RunContext


class EvaluateArgs(StageArgs):
    type: Literal["evaluate"]


class Evaluate(Stage):
    type = "evaluate"
    Args = EvaluateArgs
    settings = ("export", "evaluation")
    compares_with_dense = True

    def validate(self, recipe, model, adapter, field):
        check_runtime(recipe.evaluation.runtime)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        spec, ex, task = ctx.recipe.evaluation, ctx.recipe.export, ctx.task
        exported = ctx.onnx is not None
        # The dense graph (an export, unless cached), quality, latency, generation: a minute on MiniLM, so a bar.
        bar = ctx.events.task("evaluate", total=1 + 2 * exported + (exported and ex.decoder is not None))
        batches = task.evaluation_batches(ctx.preprocessor, spec, ex.batch_size, ex.seq_len, ex.image_size)
        dense_model, _ = load_model(ctx.recipe.model, ctx.source, task)
        if not exported:  # both models run in PyTorch, on the run's device; else the dense one is exported on the CPU
            dense_model.to(ctx.device)
        dense_tm, comp_tm = ctx.task_model(dense_model), ctx.task_model()
        dense_path = comp_path = None
        if exported:
            bar.doing("dense ONNX graph (cached after the first run)")
            example = dense_tm.example(batches.batches[0].inputs)
            dense_path = dense_onnx(dense_tm, example, ctx.source.sha256, ctx.recipe.model, ex)
            comp_path = ctx.onnx.path
            bar.advance()
        # Session options a stage asked for (quantize: the ones that keep ORT's int8 fusions), on both graphs alike.
        disabled = ctx.onnx.disabled_optimizers if exported else ()
        dense = Runner(dense_tm, dense_path, spec.latency.threads, disabled, spec.runtime)
        comp = Runner(comp_tm, comp_path, spec.latency.threads, disabled, spec.runtime)
        result = {"backend": "onnxruntime" if dense_path else "pytorch",
                  "data": {"origin": batches.origin, **batches.protocol}}
        bar.doing(f"quality on {batches.origin}" + (" and Lee" if spec.lee else ""))
        result.update(task.quality(dense, comp, HeldOut(batches, ctx.preprocessor, ex.batch_size, ex.seq_len,
                                                        spec.lee)))
        result["size"] = size(dense_model, ctx.model, dense_path, comp_path)
        bar.advance()
        if dense_path:
            bar.doing("latency, dense and compressed in turn")
            plain = (Runner(dense_tm, dense_path, spec.latency.threads, runtime=spec.runtime),
                     Runner(comp_tm, comp_path, spec.latency.threads, runtime=spec.runtime)) if disabled else None
            result["latency"] = self._latency(ctx, (dense, comp), plain, batches, disabled)
            bar.advance()
        if dense_path and ex.decoder is not None:
            bar.doing("time to first token, decode tokens/s")
            result["generation"] = self._generation(ctx, dense_path, batches, disabled)
            bar.advance()
        bar.done()
        result["plots"] = figures.against_dense(folder, ctx.workdir, result)
        ctx.evaluation = result
        return StageResult(result)  # report.md renders the evaluation from the manifest

    @staticmethod
    def _latency(ctx: RunContext, tuned: tuple[Runner, Runner], plain: tuple[Runner, Runner] | None, batches,
                 disabled: tuple[str, ...]) -> dict:
        """Latency with the session settings the artifact records (onnx.onnxruntime), and, when those switch
        optimizers off, with ONNX Runtime's defaults too: a consumer that ignores the settings gets that one."""
        spec = ctx.recipe.evaluation.latency
        timing = ctx.events.task("latency runs", total=runs(spec) * (2 if plain else 1))
        out = {**latency(*tuned, batches, spec, tick=timing.advance), "providers": tuned[1].providers}
        if plain:
            out["disabled_optimizers"] = list(disabled)
            default = latency(*plain, batches, spec, tick=timing.advance)
            out["ort_default_settings"] = {k: default[k] for k in ("dense", "compressed", "speedup")}
        timing.done()
        return out

    @staticmethod
    def _generation(ctx: RunContext, dense_path: Path, batches, disabled: tuple[str, ...]) -> dict:
        """Time to first token at the prompt length and decode tokens/s, dense against compressed."""
        spec, ex = ctx.recipe.evaluation, ctx.recipe.export
        prompts = [b.inputs["input_ids"][0].tolist() for b in batches.batches[:spec.generation.prompts]]
        new_tokens = min(spec.generation.new_tokens, ex.decoder.max_len - ex.seq_len)
        return generation.compare(dense_path, ctx.onnx.path, ctx.model, prompts, new_tokens, spec.latency.threads,
                                  spec.latency.warmup > 0, disabled, spec.runtime)

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.evaluation = result.metrics  # the verdict reads it
