"""causal-lm: a decoder predicting the next token (Llama, Qwen2, Mistral; GGUF checkpoints too).

Calibration samples random windows of the token stream and evaluation the first non-overlapping
ones, as Wanda/GBLM do on C4/WikiText (docs/methods/weight-pruning.md §2); the loss is GBLM's
next-token cross-entropy and the quality metrics the perplexity ratio to the dense model and the
top-1 next-token agreement with it. A quantized graph is gated on the same two numbers against the
float model rather than on raw logits (docs/methods/deployment.md §3).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.batches import Batches, first_windows, random_windows
from calibration.sources import load_text
from models.spec import ModelSpec

from .base import HeldOut, TextTask, logits_kl
from .metrics import Run, next_token_comparison


class CausalLM(TextTask):
    name = "causal-lm"
    input_names = ("input_ids",)
    output_names = ("logits",)
    generates = True
    accept_metrics = {"max_perplexity_ratio": "perplexity_ratio", "min_token_agreement": "token_agreement"}
    # Loose enough for round-to-nearest int4 g64 on SmolLM2-135M (x1.42, 0.60 of the top-1 tokens kept) and
    # static W8A8 (x2.6 held out, 0.42 kept); a graph with wrong scales keeps almost none.
    quantized_bounds = {"perplexity_ratio": ("max", 3.0), "token_agreement": ("min", 0.3)}

    def auto_class(self, model_type: str) -> type[Any]:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def calibration_batches(self, preprocessor, spec, field: str = "calibration",
                            image_size: int | None = None) -> Batches:
        return random_windows(preprocessor, load_text(spec, "calibration", field), spec, field)

    def evaluation_batches(self, preprocessor, spec, batch_size: int, seq_len: int,
                           image_size: int | None = None, field: str = "evaluation") -> Batches:
        text = load_text(spec, "evaluation", field)
        return first_windows(preprocessor, text, spec.num_samples, batch_size, seq_len, field)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor]:
        return (model(**inputs, use_cache=False).logits,)

    def gradient_loss(self, model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                      labels: torch.Tensor | None) -> torch.Tensor:
        """Mean next-token cross-entropy of each window (GBLM's loss), summed over windows."""
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        target = inputs["input_ids"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return ce.view(target.shape).mean(1).sum()

    def distill_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        return logits_kl(student[0], teacher[0], temperature)

    def quality(self, dense: Run, compressed: Run, held_out: HeldOut) -> dict:
        cmp = next_token_comparison((b.inputs["input_ids"], dense({"input_ids": b.inputs["input_ids"]})[0],
                                     compressed({"input_ids": b.inputs["input_ids"]})[0]) for b in held_out.batches)
        d, c = cmp["reference"], cmp["compared"]
        return {"dense": {"perplexity": round(d, 4)}, "compressed": {"perplexity": round(c, 4)},
                "comparison": {"perplexity_ratio": round(c / d, 4), "token_agreement": round(cmp["token_agreement"], 4)}}

    def quantized_fidelity(self, rows: list[tuple[dict[str, torch.Tensor], list[np.ndarray], list[np.ndarray]]]) \
            -> dict:
        """Perplexity of the quantized graph over the float model's on the same windows, and top-1 agreement."""
        cmp = next_token_comparison((inputs["input_ids"], ref[0], got[0]) for inputs, ref, got in rows)
        return {"float_perplexity": round(cmp["reference"], 4), "quantized_perplexity": round(cmp["compared"], 4),
                "perplexity_ratio": round(cmp["compared"] / cmp["reference"], 4),
                "token_agreement": round(cmp["token_agreement"], 4)}
