"""TRIM (arXiv 2409.10994): patches projected into CLIP's joint space, scored against the text embedding.

Follows docs/methods/token-pruning.md §4. ``similarity_sign: paper`` (+1) keeps the patches most
similar to the text; ``released_code`` (-1) the least similar, as the released code does. The fused
token is TRIM's plain mean of the unselected patches, so ``fuse`` defaults on. K is ``keep``, or the
paper's per-image IQR count fixed at ``percentile`` over the calibration images (§4.3,
trim_iqr.py); both signs are reported there. CLIP's text tower is exported as its own graph
(text.py) whose embedding is an input of the vision graph, so one engine serves any prompt (§4.4).
Recipe: ``{type: token_prune, method: trim, layer: -2, output: true, prompt: 'a photo of a dog'}``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from core.errors import RecipeError
from models.loading import model_config, resolve_source
from tasks import TASKS

from .base import SELECTORS, Build, Calibration, Method, SelectorArgs
from .select import top_k_raster
from .text import TEXT_FILE, Companion, TextEncoder
from .trim_iqr import counts, fixed_k, summary

SIGNS = {"paper": 1.0, "released_code": -1.0}


@SELECTORS.register
class Trim(Method):
    name = "trim"
    inputs = ("text_embeds",)
    calibration_images = True
    text_tower = True

    class Args(SelectorArgs):
        calibrates_keep = True
        method: Literal["trim"]
        fuse: bool = True
        prompt: str | None = Field(default=None, validate_default=True)  # the text the patches are scored against
        percentile: float = Field(default=90.0, gt=0, le=100)  # K = this percentile of the calibration counts
        similarity_sign: Literal["paper", "released_code"] = "paper"  # keep most (paper) or least similar
        text_len: int = Field(default=77, ge=2, le=4096)  # static token length of the text graph

        @field_validator("prompt")
        @classmethod
        def _prompt(cls, v):
            if not v:
                raise ValueError("trim needs the text the image tokens are scored against "
                                 "(e.g. prompt: 'a photo of a dog')")
            return v

    def __init__(self, k: int, sign: float, joint: tuple[nn.Module, nn.Module]):
        super().__init__(k)
        self.sign, self.norm, self.projection = sign, *joint

    def similarity(self, patches: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """[B, N]: raw dot product of each projected patch with the (unnormalised) text embedding."""
        projected = self.projection(self.norm(patches)).float()
        return torch.matmul(projected, text_embeds.float().unsqueeze(-1)).squeeze(-1)

    def select(self, tap):
        prob = torch.softmax(self.sign * self.similarity(tap.patches, tap.inputs["text_embeds"]), dim=-1)
        return top_k_raster(prob, self.k), None

    @classmethod
    def validate(cls, args, spec, model, adapter, field):
        """A CLIP vision tower with its projection, from a full CLIPModel whose text tower fits ``text_len``."""
        if adapter.joint_space(model) is None:
            raise RecipeError("trim scores patches in CLIP's image-text space: it needs a CLIP vision tower "
                              "with its projection (task image-feature-extraction on a CLIP model)",
                              field=f"{field}.method")
        source = resolve_source(spec)
        if source.model_type != "clip":
            raise RecipeError(f"trim needs CLIP's text tower, and {spec.source!r} is a "
                              f"{source.model_type!r} checkpoint: give a full CLIPModel", field=f"{field}.method")
        text = model_config(spec, source, TASKS["feature-extraction"])
        if args.text_len > text.max_position_embeddings:
            raise RecipeError(f"text_len {args.text_len} is longer than the text tower's "
                              f"{text.max_position_embeddings} positions", field=f"{field}.text_len")

    @classmethod
    def build(cls, args, k, env):
        """The prompt's embedding is the default ``text_embeds`` input; the text tower a graph next to model.onnx."""
        text = TextEncoder(*env.text, args.text_len)
        ids = text.ids([args.prompt]).expand(env.batch, -1)
        method = cls(k, SIGNS[args.similarity_sign], env.adapter.joint_space(env.model))
        return Build(method, {"text_embeds": text.embed([args.prompt])}, (Companion(TEXT_FILE, text, (ids,)),))

    @classmethod
    def calibrate(cls, args, env, probe, keep):
        """Both signs on the calibration images: IQR counts, the K each gives, fidelity to keeping every patch."""
        reference = cls.build(args, probe.patches, env)  # all N patches in raster order: the unpruned encoder
        embeds, joint = reference.defaults["text_embeds"], (reference.method.norm, reference.method.projection)
        sim, unpruned = probe.unpruned(reference, lambda patches: reference.method.similarity(patches, embeds))
        sim, metrics, rows = sim.numpy(), {}, []
        for name, sign in SIGNS.items():
            per_image = counts(sim, sign)
            k = keep if keep is not None else fixed_k(per_image, args.percentile, probe.patches)
            cosine = mean_cosine(unpruned, probe.outputs(replace(reference, method=cls(k, sign, joint))))
            used = name == args.similarity_sign
            metrics[name] = {"counts": summary(per_image, args.percentile), "keep": k, "mean_cosine": cosine,
                             "used": used}
            rows.append([name, "yes" if used else "no", *metrics[name]["counts"].values(), k, cosine])
        headers = ["sign", "used", *summary([0], args.percentile), "K", "mean cosine to all patches"]
        return Calibration(metrics[args.similarity_sign]["keep"], metrics,
                           "TRIM on the calibration images (IQR count per image, both signs)", headers, rows)


def mean_cosine(reference: np.ndarray, pruned: np.ndarray) -> float:
    """Mean cosine to keeping every patch; token sequences are compared by their mean token."""
    a, b = (torch.from_numpy(x.mean(axis=1) if x.ndim == 3 else x) for x in (reference, pruned))
    return round(float(F.cosine_similarity(a, b, dim=-1).mean()), 5)
