"""Token-prune stage: a static-K token selector inside a vision encoder, exported as part of the graph.

After block ``layer`` the encoder keeps [CLS] and K patch tokens in raster order (+ one fused
token), so every later block and the exported ONNX work on a fixed, smaller sequence; with
``output: true`` the encoder ends there instead and outputs the K selected patch features and
their indices (LLaVA-style, before the projector). Methods and their sources: tokens/methods.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator

from export.trt_targets import TOPK_MAX_K
from models import loading as models
from core.errors import RecipeError
from methods.tokens import trim
from methods.tokens.methods import METHODS, HiPrune, Method, Trim
from methods.tokens.pruner import Placement, TokenPruner
from methods.tokens.text import TEXT_FILE, Companion, TextEncoder
from tasks import TASKS

from .base import Stage, StageArgs, StageResult, Table
from .context import RunContext

TRIM_ONLY = ("prompt", "percentile", "similarity_sign", "text_len")
HIPRUNE_ONLY = ("object_layer", "alpha")
HIPRUNE_OBJECT_FRACTION = 8 / 22  # the reference's object layer 9 of LLaVA's feature layer 23 (1-based)


class TokenPruneArgs(StageArgs):
    type: Literal["token_prune"]
    method: Literal["cls_attention", "global_attention", "trim", "divprune", "hiprune"]
    layer: int  # block (0-based; negative counts from the end) whose output is pruned
    output: bool = False  # end the encoder at `layer` and output the selected patches (before a projector)
    keep: int | float | None = Field(default=None, validate_default=True)  # count, or ratio of patches
    fuse: bool | None = None  # append one token averaging the dropped ones (default: trim yes, others no)
    prompt: str | None = Field(default=None, validate_default=True)  # trim: the text the patches are scored against
    percentile: float = Field(default=90.0, gt=0, le=100)  # trim: K = this percentile of the calibration counts
    similarity_sign: Literal["paper", "released_code"] = "paper"  # trim: keep most (paper) or least similar
    text_len: int = Field(default=77, ge=2, le=4096)  # trim: static token length of the text graph
    object_layer: int | None = None  # hiprune: layer whose attention picks the anchors
    alpha: float = Field(default=0.1, gt=0, le=1)  # hiprune: anchor share of the budget (anchors = round(K·α/5))

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v, info: ValidationInfo):
        if v is None:
            if info.data.get("method", "trim") != "trim":
                raise ValueError("keep is required: a count of patch tokens (e.g. 49) or a ratio in (0, 1] "
                                 "(only trim can calibrate it)")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"keep {v!r} is neither a count of patch tokens (e.g. 49) nor a ratio in (0, 1]")
        elif isinstance(v, int) and v < 1:
            raise ValueError(f"keep {v} keeps no token: give a count >= 1 or a ratio in (0, 1]")
        elif isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"keep {v} is not a ratio in (0, 1]; write a count as an integer (e.g. keep: 49)")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v, info: ValidationInfo):
        method = info.data.get("method")
        if method == "trim" and not v:
            raise ValueError("trim needs the text the image tokens are scored against (e.g. prompt: 'a photo of a dog')")
        if method not in (None, "trim") and v is not None:
            raise ValueError("only used by method 'trim'")
        return v

    @field_validator(*TRIM_ONLY[1:], *HIPRUNE_ONLY)
    @classmethod
    def _method_only(cls, v, info: ValidationInfo):
        owner = "trim" if info.field_name in TRIM_ONLY else "hiprune"
        if info.data.get("method", owner) != owner:
            raise ValueError(f"only used by method '{owner}'")
        return v


@dataclass(frozen=True)
class Resolved:
    """The recipe's numbers made concrete for one model."""

    placement: Placement
    patches: int
    keep: int | None  # None: TRIM calibrates it


def _layer(value: int, n: int, field: str) -> int:
    if not -n <= value < n:
        raise RecipeError(f"layer {value} does not exist: the encoder has {n} blocks (0..{n - 1}, or -1..-{n})",
                          field=field)
    return value % n


def hiprune_anchors(k: int, alpha: float) -> int:
    """The reference's anchor count round(K·α/5) (Python rounding, half to even)."""
    return round(k * alpha / 5)


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
    Args = TokenPruneArgs
    changes_model = True  # the deployed graph changes (weights do not): export must come after
    after_model_changes = True  # it hooks the model as it is: a later weight change would not be selected on

    @classmethod
    def replaces_outputs(cls, args):
        return args.output

    @classmethod
    def needs_calibration(cls, args):
        return "data" if args.method == "trim" else False

    @classmethod
    def describe(cls, args):
        keep = "calibrated" if args.keep is None else f"{args.keep:g}"
        where = "output of layer" if args.output else "after layer"
        return f"{args.method} keep {keep} {where} {args.layer}" + (" +fused" if args.fuse else "")

    @property
    def fuse(self) -> bool:
        return METHODS[self.args.method].default_fuse if self.args.fuse is None else self.args.fuse

    def _resolve(self, model, adapter, field: str) -> Resolved:
        a = self.args
        tokens = adapter.vision_tokens(model)
        blocks = adapter.blocks(model)
        layer = _layer(a.layer, len(blocks), f"{field}.layer")
        object_layer = None
        if a.method == "hiprune":
            object_layer = (round(layer * HIPRUNE_OBJECT_FRACTION) if a.object_layer is None
                            else _layer(a.object_layer, len(blocks), f"{field}.object_layer"))
            if object_layer > layer:
                raise RecipeError(f"object_layer {object_layer} comes after the pruning layer {layer}; "
                                  "its attention must be computed first", field=f"{field}.object_layer")
        keep = None if a.keep is None else keep_count(a.keep, tokens.patches, f"{field}.keep")
        if a.method == "hiprune" and keep is not None and 5 * hiprune_anchors(keep, a.alpha) > keep:
            raise RecipeError(f"alpha {a.alpha:g} gives {hiprune_anchors(keep, a.alpha)} anchors, whose 5 "
                              f"neighbourhoods can exceed keep {keep}: lower alpha", field=f"{field}.alpha")
        if self.fuse and keep == tokens.patches:
            raise RecipeError(f"keep {keep} keeps every patch, so there is nothing to fuse "
                              "(lower keep or set fuse: false)", field=f"{field}.keep")
        return Resolved(Placement(layer, self.fuse, a.output, object_layer), tokens.patches, keep)

    def validate(self, recipe, model, adapter, field):
        a = self.args
        task = recipe.model.task
        if TASKS[task].modality != "images" or adapter.vision_tokens(model) is None:
            raise RecipeError(f"token pruning needs a vision encoder with a patch grid (ViT, CLIP vision tower); "
                              f"task {task!r} on a {adapter.family} model has none", field=f"{field}.type")
        self._resolve(model, adapter, field)
        if a.output and not TASKS[task].embeds:
            raise RecipeError("output: true ends the encoder at its feature layer (before a VLM projector); "
                              "it needs task image-feature-extraction", field=f"{field}.output")
        if a.method == "trim":
            self._check_trim(recipe, model, adapter, field)

    def _check_trim(self, recipe, model, adapter, field):
        if adapter.joint_space(model) is None:
            raise RecipeError("trim scores patches in CLIP's image-text space: it needs a CLIP vision tower "
                              "with its projection (task image-feature-extraction on a CLIP model)", field=f"{field}.method")
        source = models.resolve_source(recipe.model)
        if source.model_type != "clip":
            raise RecipeError(f"trim needs CLIP's text tower, and {recipe.model.source!r} is a "
                              f"{source.model_type!r} checkpoint: give a full CLIPModel", field=f"{field}.method")
        text = models.model_config(recipe.model, source, TASKS["feature-extraction"])
        if self.args.text_len > text.max_position_embeddings:
            raise RecipeError(f"text_len {self.args.text_len} is longer than the text tower's "
                              f"{text.max_position_embeddings} positions", field=f"{field}.text_len")

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        t0 = time.perf_counter()
        r = self._resolve(ctx.model, ctx.adapter, "stages")
        metrics, tables = {}, []
        if self.args.method == "trim":
            text = self._text_encoder(ctx)
            embeds = text.embed([self.args.prompt])
            k, metrics["trim"], table = self._calibrate_trim(ctx, r, embeds)
            tables.append(table)
            pruner = self._install(ctx, r.placement, k, trim.SIGNS[self.args.similarity_sign], embeds, text)
        else:
            pruner = self._install(ctx, r.placement, r.keep)
        metrics = {**pruner.describe(), "seconds": round(time.perf_counter() - t0, 3), **metrics}
        rows = [[k, v] for k, v in pruner.describe().items()]
        return StageResult(metrics, [Table("Token pruning", ["setting", "value"], rows), *tables])

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        r = self._resolve(ctx.model, ctx.adapter, "stages")
        k = result.metrics["keep"]
        if self.args.method == "trim":
            text = self._text_encoder(ctx)
            self._install(ctx, r.placement, k, trim.SIGNS[self.args.similarity_sign], text.embed([self.args.prompt]),
                          text)
        else:
            self._install(ctx, r.placement, k)

    def _text_encoder(self, ctx: RunContext) -> TextEncoder:
        model, tokenizer = models.load_model(ctx.recipe.model, ctx.source, TASKS["feature-extraction"])
        return TextEncoder(model, tokenizer, self.args.text_len)

    def _method(self, ctx: RunContext, k: int, sign: float = 1.0) -> Method:
        name = self.args.method
        if name == "trim":
            return Trim(k, sign, ctx.adapter.joint_space(ctx.model))
        if name == "hiprune":
            return HiPrune(k, anchors=hiprune_anchors(k, self.args.alpha))
        return METHODS[name](k)

    def _install(self, ctx: RunContext, placement: Placement, k: int, sign: float = 1.0,
                 embeds: torch.Tensor | None = None, text: TextEncoder | None = None) -> TokenPruner:
        """Put the selector on ctx.model; TRIM's prompt embedding is the default ``text_embeds`` input, and
        its text tower a graph exported next to model.onnx."""
        defaults = {} if embeds is None else {"text_embeds": embeds}
        companions = ()
        if text is not None:
            ids = text.ids([self.args.prompt]).expand(ctx.recipe.export.batch_size, -1)
            companions = (Companion(TEXT_FILE, text, (ids,)),)
        return TokenPruner(ctx.model, ctx.adapter, self._method(ctx, k, sign), placement, defaults, companions)

    def _calibrate_trim(self, ctx: RunContext, r: Resolved, embeds: torch.Tensor) -> tuple[int, dict, Table]:
        """Both signs on the calibration images: IQR counts, the K each gives, fidelity to keeping every patch."""
        a = self.args
        # Keeping all N patches in raster order is the unpruned encoder; its pass also yields the similarities.
        reference = self._install(ctx, Placement(r.placement.layer, False, r.placement.output), r.patches,
                                  embeds=embeds)
        similarity = []
        capture = reference.block.module.register_forward_hook(
            lambda m, args, out: similarity.append(reference.method.similarity(out[:, reference.prefix:], embeds)))
        try:
            ref_out = _outputs(ctx)
        finally:
            capture.remove()
            reference.remove()
        sim = torch.cat(similarity).numpy()
        info, rows = {}, []
        for name, sign in trim.SIGNS.items():
            per_image = trim.counts(sim, sign)
            k = r.keep if r.keep is not None else trim.fixed_k(per_image, a.percentile, r.patches)
            pruner = self._install(ctx, r.placement, k, sign, embeds)
            try:
                cosine = _mean_cosine(ref_out, _outputs(ctx))
            finally:
                pruner.remove()
            counts = trim.summary(per_image, a.percentile)
            info[name] = {"counts": counts, "keep": k, "mean_cosine": cosine, "used": name == a.similarity_sign}
            rows.append([name, "yes" if name == a.similarity_sign else "no", *counts.values(), k, cosine])
        headers = ["sign", "used", *trim.summary([0], a.percentile), "K", "mean cosine to all patches"]
        table = Table("TRIM on the calibration images (IQR count per image, both signs)", headers, rows)
        return info[a.similarity_sign]["keep"], info, table


def _outputs(ctx: RunContext) -> np.ndarray:
    """The first task output (TRIM runs on CLIP towers: the image embedding or the patch features) per image."""
    tm = ctx.task_model()
    with torch.no_grad():
        return np.concatenate([tm(*tm.example(b.inputs))[0].float().numpy() for b in ctx.calibration])


def _mean_cosine(reference: np.ndarray, pruned: np.ndarray) -> float:
    """Mean cosine to keeping every patch; token sequences are compared by their mean token."""
    a, b = (torch.from_numpy(x.mean(axis=1) if x.ndim == 3 else x) for x in (reference, pruned))
    return round(float(F.cosine_similarity(a, b, dim=-1).mean()), 5)
