"""image-classification: a vision encoder with its classifier head (ViT).

The gradient loss is cross-entropy against the folder labels, or the model's own top-1 when the
images have none; quality is the top-1 agreement with the dense model, and top-1 accuracy when
every held-out image is labelled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.spec import ModelSpec

from .base import HeldOut, ImageTask, logits_kl
from .metrics import Run, outputs


class ImageClassification(ImageTask):
    name = "image-classification"
    output_names = ("logits",)
    accept_metrics = {"min_top1_retained": "top1_agreement"}  # the dense model's top-1 kept

    def auto_class(self, model_type: str) -> type[Any]:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor]:
        return (model(**inputs).logits,)

    def gradient_loss(self, model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                      labels: torch.Tensor | None) -> torch.Tensor:
        logits = model(**inputs).logits
        target = labels if labels is not None else logits.detach().argmax(-1)
        return F.cross_entropy(logits, target, reduction="sum")

    def distill_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        return logits_kl(student[0], teacher[0], temperature)

    def quality(self, dense: Run, compressed: Run, held_out: HeldOut) -> dict:
        a, b = outputs(dense, held_out.batches), outputs(compressed, held_out.batches)
        agree = float((a.argmax(-1) == b.argmax(-1)).mean())
        out = {"dense": {}, "compressed": {}, "comparison": {"top1_agreement": round(agree, 4)}}
        labels = [batch.labels for batch in held_out.batches]
        if all(lab is not None for lab in labels):
            y = torch.cat(labels).numpy()
            out["dense"]["top1_accuracy"] = round(float((a.argmax(-1) == y).mean()), 4)
            out["compressed"]["top1_accuracy"] = round(float((b.argmax(-1) == y).mean()), 4)
        return out
