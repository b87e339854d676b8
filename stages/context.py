"""RunContext: what stages share, typed, owned by the runner.

Stages read the recipe's sections through `Settings` (the runner passes the validated recipe, which
has these fields), so this layer never imports the orchestrator.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from calibration.batches import Batches
from calibration.cache import StatsCache, state_digest
from calibration.distributed import World
from calibration.spec import CalibrationSpec
from core.events import Events
from evaluation.spec import EvaluationSpec
from export.decoder import DECODE
from export.gate import MAIN, LayerSparsity
from export.spec import ExportSpec
from models.adapters import Adapter
from models.loading import Source
from models.offload import Offloaded
from models.spec import ModelSpec
from tasks import TASKS, Task, TaskModel
from tasks.decoder import CachedDecoder


class Settings(Protocol):
    """The recipe sections stages read."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> ModelSpec: ...
    @property
    def calibration(self) -> CalibrationSpec: ...
    @property
    def export(self) -> ExportSpec: ...
    @property
    def evaluation(self) -> EvaluationSpec: ...


@dataclass
class Statistics:
    """Calibration results of the model as calibrated (the last calibrate stage)."""

    kinds: frozenset[str] = frozenset()  # what the stages this calibration serves asked for (set by the runner)
    dense: dict | None = None  # per Linear input statistics
    gradients: dict | None = None  # per Linear per-sample gradient sums
    gradients_key: str | None = None  # cache key of ``gradients`` (keys statistics derived from them)


@dataclass
class OnnxArtifact:
    """The exported graph: its path, what the manifest records about it, and how ONNX Runtime must run it."""

    path: Path
    info: dict  # io, opset, parity, sparsity check, TensorRT readiness, quantization (manifest "onnx")
    disabled_optimizers: tuple[str, ...] = ()  # ORT optimizers that would undo the graph's precision

    @property
    def graphs(self) -> list[tuple[str, Path]]:
        """(name, path) of every graph that ships: the task graph (a decoder's prefill graph), then the decode graph."""
        decode = self.info.get(DECODE)
        return [(MAIN, self.path)] + ([(DECODE, self.path.with_name(decode["path"]))] if decode else [])

    def record(self) -> dict:
        """The manifest's "onnx" entry."""
        ort = {"onnxruntime": {"disabled_optimizers": list(self.disabled_optimizers)}} if self.disabled_optimizers else {}
        return {**self.info, **ort}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.record(), indent=1))

    @classmethod
    def load(cls, onnx_path: Path, path: Path) -> OnnxArtifact:
        info = json.loads(path.read_text())
        disabled = tuple(info.pop("onnxruntime", {}).get("disabled_optimizers", ()))
        return cls(onnx_path, info, disabled)


@dataclass
class RunContext:
    recipe: Settings
    source: Source
    model: nn.Module
    preprocessor: object
    adapter: Adapter
    workdir: Path  # the run folder being written (renamed into place at the end)
    cache: StatsCache
    events: Events
    calibration: Batches | None = None
    statistics: Statistics = field(default_factory=Statistics)
    sparsity: dict[str, LayerSparsity] = field(default_factory=dict)  # Linear name -> what pruning left
    # Linear name -> [N, groups] float32 scales its weights lie on exactly (gptq); the quantize stage stores them
    weight_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    stage_index: int = 0
    onnx: OnnxArtifact | None = None
    evaluation: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the run's (core/device.py)
    world: World | None = None  # under torchrun: the processes the calibrate stage's dense pass spreads over
    offload: Offloaded | None = None  # model.offload: ``model`` is a meta skeleton over these weights

    def model_digest(self) -> str:
        """What statistics are cached under: the exact weights (of the files, when offloaded)."""
        return self.offload.digest() if self.offload else state_digest(self.model)

    def held(self, prefix: str, write: bool) -> contextlib.AbstractContextManager:
        """Block ``prefix``'s weights in memory (and staged after, with ``write``); a no-op unless offloaded."""
        return self.offload.block(prefix, write) if self.offload else contextlib.nullcontext()

    def to_cpu(self) -> None:
        """Move the model to the CPU for the rest of the run. Export (ONNX and GGUF) and token pruning
        call it: the exporters trace and serialize CPU tensors, the ONNX parity check compares with
        PyTorch on the CPU, and every stage after an export reads the exported graph, so nothing that
        follows needs the GPU (the recipe rules put export after every stage that changes the model).
        An offloaded model's skeleton stays on the meta device; its blocks are read onto the CPU."""
        if self.offload is not None:
            self.offload.device = torch.device("cpu")
            return
        self.model = self.model.cpu()

    @property
    def task(self) -> Task:
        """What the recipe's ``model.task`` means (data, outputs, loss, metrics)."""
        return TASKS[self.recipe.model.task]

    def task_model(self, model: nn.Module | None = None) -> TaskModel:
        """The model as deployed: with ``export.decoder``, the cached decoder both graphs are exported from."""
        model = model if model is not None else self.model
        decoder = self.recipe.export.decoder
        if decoder is not None:
            return CachedDecoder(model, self.recipe.model, self.adapter, decoder.max_len).eval()
        return TaskModel(model, self.recipe.model).eval()
