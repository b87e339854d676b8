"""feature-extraction: a text encoder's sentence embedding (BERT/MiniLM pooled, or CLIP's text tower).

Calibration samples whole paragraphs, padded and masked. The gradient loss is unsupervised SimCSE
(Gao et al., arXiv:2104.08821): each text twice with dropout on, InfoNCE over the batch. Quality
is the cosine to the dense embeddings and the Lee et al. (2005) document-similarity correlation
(calibration/data/lee/README.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.batches import Batches, encode_texts, held_out_paragraphs, random_paragraphs
from calibration.sources import LEE_SOURCE, lee_benchmark, load_text
from models.spec import ModelSpec

from .base import HeldOut, TextTask, embedding_distill, embedding_outputs
from .metrics import Run, cosine_comparison, lee_correlation, outputs

SIMCSE_TEMPERATURE = 0.05


class FeatureExtraction(TextTask):
    name = "feature-extraction"
    input_names = ("input_ids", "attention_mask")
    output_names = ("embedding", "last_hidden_state")
    embeds = True
    gradients_in_train_mode = True  # SimCSE's two views differ only by dropout
    gradients_couple_samples = True  # SimCSE's negatives are the batch's other samples
    accept_metrics = {"min_mean_cosine": "mean_cosine", "min_min_cosine": "min_cosine"}

    def auto_class(self, model_type: str) -> type[Any]:
        import transformers as tf

        return tf.CLIPTextModelWithProjection if model_type.startswith("clip") else tf.AutoModel

    def check_evaluation(self, spec) -> None:
        super().check_evaluation(spec)
        if spec.lee:
            lee_benchmark()

    def calibration_batches(self, preprocessor, spec, field: str = "calibration",
                            image_size: int | None = None) -> Batches:
        return random_paragraphs(preprocessor, load_text(spec, "calibration", field), spec, field)

    def evaluation_batches(self, preprocessor, spec, batch_size: int, seq_len: int,
                           image_size: int | None = None, field: str = "evaluation") -> Batches:
        text = load_text(spec, "evaluation", field)
        return held_out_paragraphs(preprocessor, text, spec.num_samples, spec.seed, batch_size, seq_len, field)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return embedding_outputs(model, inputs, spec)

    def gradient_loss(self, model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                      labels: torch.Tensor | None) -> torch.Tensor:
        """SimCSE: in-batch negatives couple rows, so a row's gradient is its contribution to the batch loss."""
        doubled = {n: torch.cat([inputs[n], inputs[n]]) for n in self.input_names if n in inputs}
        emb = self.forward(model, doubled, spec)[0]
        a, b = F.normalize(emb, dim=-1).chunk(2)
        sim = a @ b.T / SIMCSE_TEMPERATURE
        return F.cross_entropy(sim, torch.arange(len(a), device=sim.device), reduction="sum")

    def distill_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        return embedding_distill(student, teacher, inputs.get("attention_mask"))

    def quality(self, dense: Run, compressed: Run, held_out: HeldOut) -> dict:
        out = cosine_comparison(outputs(dense, held_out.batches), outputs(compressed, held_out.batches))
        if held_out.lee:
            lee = lee_benchmark()
            n = len(lee.documents)
            docs = encode_texts(held_out.preprocessor, lee.documents, held_out.batch_size, held_out.seq_len)
            human = np.array(lee.similarity)
            out["dense"]["lee"] = lee_correlation(dense, docs, n, human)
            out["compressed"]["lee"] = lee_correlation(compressed, docs, n, human)
            out["lee_protocol"] = {"documents": n, "pairs": n * (n - 1) // 2, "seq_len": held_out.seq_len,
                                   "source": LEE_SOURCE}
        return out
