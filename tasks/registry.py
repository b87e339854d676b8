"""The tasks by name (the recipe's ``model.task``), and loading a checkpoint for the task it records."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from models import loading

from .base import Task
from .causal_lm import CausalLM
from .feature_extraction import FeatureExtraction
from .image_classification import ImageClassification
from .image_features import ImageFeatures
from .image_text import ImageTextToText

TASKS: dict[str, Task] = {t.name: t for t in (CausalLM(), FeatureExtraction(), ImageClassification(), ImageFeatures(),
                                             ImageTextToText())}


def load_checkpoint(folder: str | Path) -> tuple[nn.Module, object]:
    """A run folder's ``checkpoint/`` (or a stage's ``model/``), structurally pruned or not, with its
    tokenizer or image processor."""
    return loading.load_checkpoint(folder, TASKS[loading.checkpoint_task(folder)])
