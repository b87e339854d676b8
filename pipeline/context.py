"""RunContext: everything stages share, owned by the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from calibration.batches import Batches
from calibration.cache import StatsCache

from .adapters import Adapter
from .events import Events
from .models import Source
from .recipe import Recipe
from .tasks import TaskModel


@dataclass
class RunContext:
    recipe: Recipe
    source: Source
    model: nn.Module
    preprocessor: object
    adapter: Adapter
    workdir: Path  # the run folder being written (renamed into place at the end)
    cache: StatsCache
    events: Events
    calibration: Batches | None = None
    dense_stats: dict | None = None  # per Linear input statistics of the model as calibrated
    gradients: dict | None = None  # per Linear per-sample gradient sums of the model as calibrated
    gradients_key: str | None = None  # cache key of ``gradients`` (keys statistics derived from them)
    sparsity: dict = field(default_factory=dict)  # Linear name -> {pattern, sparsity} set by pruning
    stage_index: int = 0
    onnx_path: Path | None = None
    onnx: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)

    def task_model(self, model: nn.Module | None = None) -> TaskModel:
        return TaskModel(model if model is not None else self.model, self.recipe.model).eval()
