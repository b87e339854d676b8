"""What a task is: the data it reads, the graph it deploys, how it loads, its loss and its quality.

One `Task` object per recipe ``model.task`` (tasks/registry.py); code that would test the task
string asks the object instead. Modality is the split most behaviour follows, so `TextTask` and
`ImageTask` hold what the text (or image) tasks share, and each task module adds its own outputs,
loss and metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.batches import Batches, first_images, random_images
from calibration.sources import MODALITY, check_dataset, image_files, load_images, text_files
from calibration.spec import DataSpec
from core.errors import RecipeError
from models.spec import ModelSpec

from .metrics import Run


@dataclass(frozen=True)
class HeldOut:
    """What a task's quality metrics run on besides the two models: the held-out batches, and the
    preprocessor and export shapes that extra benchmarks (Lee) are encoded with."""

    batches: Batches
    preprocessor: object
    batch_size: int
    seq_len: int
    lee: bool  # the recipe's evaluation.lee


class Task(ABC):
    name: ClassVar[str]
    modality: ClassVar[Literal["text", "images"]]  # what the data sources must give
    input_names: ClassVar[tuple[str, ...]]  # the deployed graph's inputs, in order
    output_names: ClassVar[tuple[str, ...]]  # and its outputs
    embeds: ClassVar[bool] = False  # outputs (embedding, last_hidden_state): the encoder's features, no head
    gradients_in_train_mode: ClassVar[bool] = False  # dropout on while the gradient loss runs
    # the gradient loss couples a batch's samples (in-batch negatives): backward whole batches, not one sample at a time
    gradients_couple_samples: ClassVar[bool] = False
    # a vision-language task: an output-placed token pruner's patches go on into its language model
    reads_pruned_tokens: ClassVar[bool] = False
    generates: ClassVar[bool] = False  # a text generator: export.decoder can deploy it (tasks/decoder.py)
    source_hint: ClassVar[str]  # which sources give this modality (error messages)
    # evaluation.accept fields this task can be gated on -> the key of quality()'s "comparison" each bounds
    # (a "max_" field is an upper bound, a "min_" field a lower one)
    accept_metrics: ClassVar[dict[str, str]] = {}
    # bounds replacing the logits parity check for quantized graphs: metric of quantized_fidelity -> (max|min, value)
    quantized_bounds: ClassVar[dict[str, tuple[Literal["max", "min"], float]]] = {}

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def check_data(self, spec: DataSpec, field: str) -> None:
        """Before any work: the source gives this task's modality and its path exists."""
        given = MODALITY.get(spec.source)
        if given is not None and given != self.modality:
            raise RecipeError(f"task {self.name!r} needs {self.modality}: {self.source_hint}", field=f"{field}.source")
        if spec.source == "files":
            text_files(spec.required_path(field), field)
        elif spec.source == "images":
            image_files(spec.required_path(field), field)
        elif spec.source == "datasets":
            check_dataset(spec, self.modality == "images", field)

    def check_evaluation(self, spec) -> None:
        """Before any work: what the evaluate stage will read (``spec``: the EvaluationSpec)."""
        self.check_data(spec, "evaluation")
        given = spec.accept.model_dump(exclude_none=True) if spec.accept is not None else {}
        for name in given:
            if name not in self.accept_metrics:
                able = ", ".join(self.accept_metrics) or "none"
                raise RecipeError(f"task {self.name!r} has no metric for {name} (its gate fields: {able})",
                                  field=f"evaluation.accept.{name}")

    def check_checkpoint(self, model: nn.Module, folder: Path) -> None:
        """Before any work: what the task needs of a local checkpoint beyond its weights (``model``: its
        structure on the meta device)."""

    def check_gradients(self, field: str) -> None:
        """Raise a RecipeError when the task has no loss to take gradients of (GBLM)."""

    @abstractmethod
    def auto_class(self, model_type: str) -> type[Any]:
        """The transformers class that loads a ``model_type`` checkpoint for this task."""

    @abstractmethod
    def preprocessor(self, where: str | Path, **kw) -> object:
        """The tokenizer or image processor saved at ``where``."""

    @abstractmethod
    def calibration_batches(self, preprocessor, spec, field: str = "calibration",
                            image_size: int | None = None) -> Batches:
        """``spec`` is a CalibrationSpec: num_samples samples of seq_len tokens (or images), seeded."""

    @abstractmethod
    def evaluation_batches(self, preprocessor, spec, batch_size: int, seq_len: int,
                           image_size: int | None = None, field: str = "evaluation") -> Batches:
        """Held-out samples at the export shapes ([batch_size, seq_len]) so the artifact itself can run them."""

    def graph_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A data batch as ``model`` (as token pruning left it) reads it; the batch itself for most tasks."""
        return inputs

    @abstractmethod
    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        """The deployed outputs (``output_names``) of the model on its keyword inputs."""

    @abstractmethod
    def gradient_loss(self, model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                      labels: torch.Tensor | None) -> torch.Tensor:
        """A loss that is a *sum* of per-sample terms, so per-sample gradients are well defined."""

    @abstractmethod
    def distill_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        """How far the student's deployed outputs (``forward``) are from the teacher's, as a mean over
        samples (docs/methods/recovery.md, distillation); ``temperature`` softens logits."""

    @abstractmethod
    def quality(self, dense: Run, compressed: Run, held_out: HeldOut) -> dict:
        """The compressed model against the dense one: {"dense": ..., "compressed": ..., "comparison": ...}."""

    def quantized_fidelity(self, rows: list[tuple[dict[str, torch.Tensor], list[np.ndarray], list[np.ndarray]]]) \
            -> dict | None:
        """For a quantized graph, per batch (inputs, float outputs, quantized outputs): the metrics
        ``quantized_bounds`` gate instead of the logits parity; None keeps the parity check."""
        return None


class TextTask(Task):
    modality = "text"
    source_hint = "use source 'builtin', 'files' or 'datasets'"

    def preprocessor(self, where: str | Path, **kw) -> object:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where, **kw)


class ImageTask(Task):
    modality = "images"
    input_names: ClassVar[tuple[str, ...]] = ("pixel_values",)
    source_hint = "set source 'images' with a folder path, or 'datasets' (the built-in data is text)"

    def preprocessor(self, where: str | Path, **kw) -> object:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(where, **kw)

    def calibration_batches(self, preprocessor, spec, field: str = "calibration",
                            image_size: int | None = None) -> Batches:
        return random_images(preprocessor, load_images(spec, field), spec, image_size)

    def evaluation_batches(self, preprocessor, spec, batch_size: int, seq_len: int,
                           image_size: int | None = None, field: str = "evaluation") -> Batches:
        return first_images(preprocessor, load_images(spec, field), spec.num_samples, batch_size, image_size)


def embedding_outputs(model: nn.Module, inputs: dict[str, torch.Tensor],
                      spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, last_hidden_state): a projection head's embedding (CLIP) or the pooled hidden states,
    L2-normalized when the recipe asks."""
    out = model(**inputs)
    hidden = out.last_hidden_state
    projected = getattr(out, "text_embeds", None)
    if projected is None:
        projected = getattr(out, "image_embeds", None)
    emb = projected if projected is not None else pool(hidden, inputs.get("attention_mask"), spec.pooling)
    if spec.normalize:
        emb = F.normalize(emb, dim=-1)
    return emb, hidden


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions over the last axis, mean over
    every prediction, times T^2 so the gradient scale does not shrink with T (Hinton et al. 2015)."""
    t = temperature
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / t, -1)
    p = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / t, -1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def embedding_distill(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                      mask: torch.Tensor | None) -> torch.Tensor:
    """(1 - cosine) + MSE on the embedding, plus MSE on the last hidden states over real tokens.

    The cosine is what the evaluation measures; the MSE terms also pin the scale, and the hidden
    states give a signal per token rather than one per sample."""
    (emb_s, hid_s), (emb_t, hid_t) = student[:2], teacher[:2]
    emb_s, emb_t, hid_s, hid_t = emb_s.float(), emb_t.float(), hid_s.float(), hid_t.float()
    loss = (1 - F.cosine_similarity(emb_s, emb_t, dim=-1)).mean() + F.mse_loss(emb_s, emb_t)
    return loss + token_mse(hid_s, hid_t, mask)


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Squared error of [batch, tokens, features] states, averaged over features and then over the
    real tokens only (``mask`` 1; None: every token): padding carries no meaning and would otherwise
    dominate short texts. The hidden-state term above and intermediate-layer distillation share it."""
    err = (student - teacher).pow(2).mean(-1)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1)
