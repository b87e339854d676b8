"""Token-prune stage: a static-K token selector inside a vision encoder, exported as part of the graph.

After block ``layer`` the encoder keeps [CLS] and K patch tokens in raster order (+ one fused
token), so every later block and the exported ONNX work on a fixed, smaller sequence; with
``output: true`` the encoder ends there instead and outputs the K selected patch features and
their indices (LLaVA-style, before the projector). The selectors, their own fields and sources are
methods/tokens/ (one module each, in `SELECTORS`); the stage asks the chosen one what it needs,
checks and builds it, and has no per-method branch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BeforeValidator

from core.errors import RecipeError
from core.registry import stage_args
from evaluation import token_sweep
from export.trt_targets import TOPK_MAX_K
from methods.tokens import SELECTORS
from methods.tokens.base import Build, Env, Method, block_index, check_keep
from methods.tokens.pruner import Placement, TokenPruner
from models import loading as models
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks import TASKS, TaskModel
from tasks.image_text import feature_block

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext


class TokenPruneBase(StageArgs):
    """The stage's own fields; ``method`` picks the selector, whose Args add keep, fuse and its own."""

    type: Literal["token_prune"]
    layer: int  # block (0-based; negative counts from the end) whose output is pruned
    output: bool = False  # end the encoder at `layer` and output the selected patches (before a projector)
    # other keeps measured on the calibration images for report.md's quality-against-K table and figure
    # (one pass over them each; evaluation/token_sweep.py)
    sweep: list[Annotated[int | float, BeforeValidator(check_keep)]] = []


@dataclass(frozen=True)
class Resolved:
    """The recipe's numbers made concrete for one model."""

    placement: Placement
    patches: int
    keep: int | None  # None: the selector calibrates it


def keep_count(keep: int | float, patches: int, field: str) -> int:
    """A count stays; a ratio becomes round(ratio·N). Either must leave 1..N patch tokens."""
    k = keep if isinstance(keep, int) else int(round(keep * patches))
    if k < 1:
        raise RecipeError(f"keep {keep} of {patches} patch tokens rounds to 0 tokens", field=field)
    if k > patches:
        raise RecipeError(f"keep {k} is more than the {patches} patch tokens of this encoder", field=field)
    if k >= TOPK_MAX_K:
        raise RecipeError(f"keep {k} is too large for TensorRT's TopK (K < {TOPK_MAX_K})", field=field)
    return k


class TokenPrune(Stage):
    type = "token_prune"
    Args = stage_args(SELECTORS, TokenPruneBase)
    cpu_only = True
    changes_model = True  # the deployed graph changes (weights do not): export must come after
    after_model_changes = True  # it hooks the model as it is: a later weight change would not be selected on

    @classmethod
    def replaces_outputs(cls, args, task):
        if args.output and not TASKS[task].reads_pruned_tokens:
            return "output (an encoder ended at its feature layer)"
        return None

    @classmethod
    def needs_calibration(cls, args):
        return "data" if SELECTORS[args.method].calibration_images or args.sweep else False

    @classmethod
    def describe(cls, args):
        keep = "calibrated" if args.keep is None else f"{args.keep:g}"
        where = "output of layer" if args.output else "after layer"
        return f"{args.method} keep {keep} {where} {args.layer}" + (" +fused" if args.fuse else "")

    @property
    def selector(self) -> type[Method]:
        return SELECTORS[self.args.method]

    def _resolve(self, model, adapter, field: str) -> Resolved:
        a = self.args
        tokens = adapter.vision_tokens(model)
        blocks = len(adapter.vision_blocks(model))
        layer = block_index(a.layer, blocks, f"{field}.layer")
        keep = None if a.keep is None else keep_count(a.keep, tokens.patches, f"{field}.keep")
        object_layer = self.selector.resolve(a, layer, blocks, keep, field)
        if a.fuse and keep == tokens.patches:
            raise RecipeError(f"keep {keep} keeps every patch, so there is nothing to fuse "
                              "(lower keep or set fuse: false)", field=f"{field}.keep")
        return Resolved(Placement(layer, a.fuse, a.output, object_layer), tokens.patches, keep)

    def validate(self, recipe, model, adapter, field):
        a = self.args
        task = recipe.model.task
        if TASKS[task].modality != "images" or adapter.vision_tokens(model) is None:
            raise RecipeError(f"token pruning needs a vision encoder with a patch grid (ViT, CLIP vision tower); "
                              f"task {task!r} on a {adapter.family} model has none", field=f"{field}.type")
        r = self._resolve(model, adapter, field)
        for i, keep in enumerate(a.sweep):
            keep_count(keep, r.patches, f"{field}.sweep[{i}]")
        if adapter.projects_image_tokens:
            _check_vlm(a, r, model, field)
        elif a.output and not TASKS[task].embeds:
            raise RecipeError("output: true ends the encoder at its feature layer (before a VLM projector); "
                              "it needs task image-feature-extraction", field=f"{field}.output")
        self.selector.validate(a, recipe.model, model, adapter, field)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        t0 = time.perf_counter()
        r = self._resolve(ctx.model, ctx.adapter, "stages")
        env = self._env(ctx)
        calibration = self.selector.calibrate(self.args, env, _Probe(ctx, r.placement, r.patches), r.keep)
        k = r.keep if calibration is None else calibration.keep
        measured = self._sweep(ctx, r, env, k) if self.args.sweep else None
        pruner = _install(ctx, r.placement, self.selector.build(self.args, k, env))
        metrics = {**pruner.describe(), "seconds": round(time.perf_counter() - t0, 3)}
        rows = [[setting, value] for setting, value in pruner.describe().items()]
        tables = [Table("Token pruning", ["setting", "value"], rows)]
        if calibration is not None:
            metrics[self.args.method] = calibration.metrics
            tables.append(Table(calibration.title, calibration.headers, calibration.rows))
        if measured is not None:
            headers, swept, metrics["plots"] = token_sweep.report(measured, folder, ctx.workdir)
            metrics["sweep"] = {name: {str(kk): v for kk, v in values.items()} for name, values in measured.items()}
            tables.append(Table(token_sweep.TITLE, headers, swept))
        return StageResult(metrics, tables)

    def _sweep(self, ctx: RunContext, r: Resolved, env: Env, k: int) -> dict[str, dict[int, float]]:
        """Quality against K on the calibration images (the recipe's K and every ``sweep`` keep)."""
        probe = _Probe(ctx, r.placement, r.patches)
        _, unpruned = probe.unpruned(self.selector.build(self.args, r.patches, env), lambda t: t[:, :0])
        keeps = {k, *(keep_count(x, r.patches, "stages.sweep") for x in self.args.sweep)} - {r.patches}
        outputs = {kk: probe.outputs(self.selector.build(self.args, kk, env)) for kk in sorted(keeps)}
        labels = [b.labels for b in ctx.calibration]
        return token_sweep.sweep(sorted(keeps), r.patches, unpruned, outputs,
                                 None if any(y is None for y in labels) else torch.cat(labels), not ctx.task.embeds)

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        r = self._resolve(ctx.model, ctx.adapter, "stages")
        _install(ctx, r.placement, self.selector.build(self.args, result.metrics["keep"], self._env(ctx)))

    def _env(self, ctx: RunContext) -> Env:
        """The encoder, plus CLIP's text tower (task feature-extraction) if the selector reads one: the model's
        own checkpoint's, or that of the CLIP checkpoint it names (`Method.text_source`), with its joint space."""
        if not self.selector.text_tower:
            return Env(ctx.model, ctx.adapter, ctx.recipe.export.batch_size)
        folder = self.selector.text_source(self.args)
        if folder is None:
            text = models.load_model(ctx.recipe.model, ctx.source, TASKS["feature-extraction"])
            return Env(ctx.model, ctx.adapter, ctx.recipe.export.batch_size, text)
        spec = ModelSpec(source=folder, task="feature-extraction")
        source = models.resolve_source(spec)
        return Env(ctx.model, ctx.adapter, ctx.recipe.export.batch_size,
                   models.load_model(spec, source, TASKS["feature-extraction"]), _joint_space(spec, source))


def _joint_space(spec: ModelSpec, source: models.Source) -> tuple[torch.nn.Module, torch.nn.Module]:
    """CLIP's image side of the joint space (post-LN, visual projection) of a full CLIP checkpoint."""
    task = TASKS["image-feature-extraction"]
    vision = task.auto_class(source.model_type).from_pretrained(
        source.local, config=models.model_config(spec, source, task), dtype=torch.float32, use_safetensors=True)
    joint = adapter_for(source.model_type, task.name).joint_space(vision.eval())
    assert joint is not None  # plan time checked a full CLIP checkpoint (methods/tokens/prompted.py)
    return joint


def _check_vlm(args, r: Resolved, model, field: str) -> None:
    """A VLM prunes where its projector reads: the output of the vision feature layer, [CLS] dropped."""
    config = model.config
    block = feature_block(config)
    if not args.output:
        raise RecipeError("a vision-language model prunes the patches its projector reads: set output: true "
                          f"and layer: {block} (its vision_feature_layer)", field=f"{field}.output")
    if r.placement.layer != block:
        raise RecipeError(f"layer {args.layer} is not where the projector reads: vision_feature_layer "
                          f"{config.vision_feature_layer} is block {block}; set layer: {block}", field=f"{field}.layer")
    if config.vision_feature_select_strategy != "default":
        raise RecipeError("token pruning selects patch tokens, and this model's projector also reads [CLS] "
                          "(vision_feature_select_strategy 'full'); only 'default' models can be pruned",
                          field=f"{field}.type")


def _install(ctx: RunContext, placement: Placement, build: Build) -> TokenPruner:
    return TokenPruner(ctx.model, ctx.adapter, build.method, placement, build.defaults, build.companions)


@dataclass(frozen=True)
class _Probe:
    """`methods.tokens.base.Probe` on the run's calibration images."""

    ctx: RunContext
    placement: Placement
    patches: int

    def unpruned(self, build: Build, capture: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        # Keeping all N patches in raster order is the unpruned encoder; its pass also yields the captures.
        pruner = _install(self.ctx, Placement(self.placement.layer, False, self.placement.output), build)
        captured = []
        hook = pruner.block.module.register_forward_hook(
            lambda m, args, out: captured.append(capture(out[:, pruner.prefix:])))
        try:
            outputs = _outputs(self.ctx)
        finally:
            hook.remove()
            pruner.remove()
        return torch.cat(captured), outputs

    def outputs(self, build: Build) -> np.ndarray:
        pruner = _install(self.ctx, self.placement, build)
        try:
            return _outputs(self.ctx)
        finally:
            pruner.remove()


def _outputs(ctx: RunContext) -> np.ndarray:
    """The first task output (e.g. the image embedding, the patch features, a VLM's logits) per calibration image:
    of the task's own model, which runs the vision tower (with ``export.decoder`` the exported decoder does not)."""
    tm = TaskModel(ctx.model, ctx.recipe.model).eval()
    with torch.no_grad():
        return np.concatenate([tm(*tm.example(b.inputs))[0].float().numpy() for b in ctx.calibration])
