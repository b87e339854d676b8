"""What a task means: the deployed inputs and outputs, and the loss used for gradient statistics.

`TaskModel` is the single definition of a task's outputs; export, the ONNX parity check and
evaluation all run it, so "the embedding" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import RecipeError
from .spec import ModelSpec

INPUTS = {
    "causal-lm": ("input_ids",),
    "feature-extraction": ("input_ids", "attention_mask"),
    "image-classification": ("pixel_values",),
    "image-feature-extraction": ("pixel_values",),
}
OUTPUTS = {
    "causal-lm": ("logits",),
    "feature-extraction": ("embedding", "last_hidden_state"),
    "image-classification": ("logits",),
    "image-feature-extraction": ("embedding", "last_hidden_state"),
}
SIMCSE_TEMPERATURE = 0.05
TOKEN_PRUNER = "token_pruner"  # instance attribute where a token pruner (methods/tokens/pruner.py) sits


class TokenPrunerHook(Protocol):
    """What the task model needs from a token pruner installed on the model it wraps."""

    input_names: tuple[str, ...]  # extra graph inputs (TRIM's text embedding)
    output_names: tuple[str, ...] | None  # replaces the task's outputs when the encoder ends at the pruner

    def default(self, name: str, batch: int) -> torch.Tensor: ...
    def run(self, forward: Callable[[], tuple], inputs: dict[str, torch.Tensor]) -> tuple: ...


def token_pruner(model: nn.Module) -> TokenPrunerHook | None:
    """The pruner the token_prune stage put on ``model``, if any (a plain attribute: never in a state dict)."""
    return model.__dict__.get(TOKEN_PRUNER)


class TaskModel(nn.Module):
    """The model as deployed: positional tensor inputs in ``INPUTS[task]`` order, outputs as named.

    A token pruner on the model (stage token_prune) may add inputs (TRIM's text embedding) and,
    when it ends the encoder, replace the outputs with (image_features, token_index).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.task = model, spec.task
        self.pooling, self.normalize = spec.pooling, spec.normalize
        self.tokens = token_pruner(model)
        self.input_names, self.output_names = INPUTS[spec.task], OUTPUTS[spec.task]
        if self.tokens is not None:
            self.input_names += self.tokens.input_names
            self.output_names = self.tokens.output_names or self.output_names

    def example(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Positional inputs for a data batch; inputs data does not carry come from the token pruner."""
        batch = next(iter(inputs.values())).shape[0]
        return tuple(inputs[n] if n in inputs else self.tokens.default(n, batch) for n in self.input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kw = dict(zip(self.input_names, inputs))
        if self.tokens is None:
            return self._outputs(kw)
        extra = {n: kw.pop(n) for n in self.tokens.input_names}
        return self.tokens.run(lambda: self._outputs(kw), extra)

    def _outputs(self, kw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.task in ("causal-lm", "image-classification"):
            extra = {"use_cache": False} if self.task == "causal-lm" else {}
            return (self.model(**kw, **extra).logits,)
        out = self.model(**kw)
        hidden = out.last_hidden_state
        projected = getattr(out, "text_embeds", None)
        if projected is None:
            projected = getattr(out, "image_embeds", None)
        emb = projected if projected is not None else pool(hidden, kw.get("attention_mask"), self.pooling)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb, hidden


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def check_gradient_task(task: str, field: str) -> None:
    if task == "image-feature-extraction":
        raise RecipeError("gradient statistics need a task loss, and image-feature-extraction has none "
                          "(use wanda or magnitude, or an image-classification head)", field=field)


def gradient_loss(model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
    """A loss that is a *sum* of per-sample terms, so per-sample gradients are well defined.

    - causal-lm: mean next-token cross-entropy of each window (GBLM's loss), summed over windows;
    - feature-extraction: unsupervised SimCSE (each text twice, dropout on, InfoNCE over the batch);
      in-batch negatives couple rows, so a row's gradient is its contribution to the batch loss;
    - image-classification: cross-entropy against the labels, or the model's own top-1 when none.
    """
    task = spec.task
    if task == "causal-lm":
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        target = inputs["input_ids"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return ce.view(target.shape).mean(1).sum()
    if task == "feature-extraction":
        doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
        emb = TaskModel(model, spec)(*(doubled[n] for n in INPUTS[task]))[0]
        a, b = F.normalize(emb, dim=-1).chunk(2)
        sim = a @ b.T / SIMCSE_TEMPERATURE
        return F.cross_entropy(sim, torch.arange(len(a)), reduction="sum")
    if task == "image-classification":
        logits = model(**inputs).logits
        target = labels if labels is not None else logits.detach().argmax(-1)
        return F.cross_entropy(logits, target, reduction="sum")
    check_gradient_task(task, "stages")
    raise AssertionError(task)
