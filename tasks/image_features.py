"""image-feature-extraction: a vision encoder's image embedding (CLIP's vision tower, a plain ViT).

The features a VLM projector or a retrieval index consumes; token pruning may end the encoder
early and output the selected patch features instead (stages/token_prune.py). There is no task
loss, so gradient statistics (GBLM) are refused; quality is the cosine to the dense embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import RecipeError
from models.spec import ModelSpec

from .base import HeldOut, ImageTask, embedding_distill, embedding_outputs
from .metrics import Run, cosine_comparison, outputs


class ImageFeatures(ImageTask):
    name = "image-feature-extraction"
    output_names = ("embedding", "last_hidden_state")
    embeds = True
    accept_metrics = {"min_mean_cosine": "mean_cosine", "min_min_cosine": "min_cosine"}

    def auto_class(self, model_type: str) -> type[Any]:
        import transformers as tf

        return tf.CLIPVisionModelWithProjection if model_type.startswith("clip") else tf.AutoModel

    def check_gradients(self, field: str) -> None:
        raise _no_loss(field)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return embedding_outputs(model, inputs, spec)

    def gradient_loss(self, model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                      labels: torch.Tensor | None) -> torch.Tensor:
        raise _no_loss("stages")

    def distill_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        return embedding_distill(student, teacher, None)

    def quality(self, dense: Run, compressed: Run, held_out: HeldOut) -> dict:
        return cosine_comparison(outputs(dense, held_out.batches), outputs(compressed, held_out.batches))


def _no_loss(field: str) -> RecipeError:
    return RecipeError("gradient statistics need a task loss, and image-feature-extraction has none "
                       "(use wanda or magnitude, or an image-classification head)", field=field)
