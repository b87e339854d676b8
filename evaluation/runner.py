"""Running the deployed model on a batch, through ONNX Runtime (the file that ships) or PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export import onnx as onnx_export
from tasks import TaskModel


class Runner:
    """Runs a batch (the model's keyword inputs) through ONNX Runtime or PyTorch and returns numpy outputs:
    a tasks.metrics `Run`."""

    def __init__(self, module: TaskModel, onnx_path: Path | None, threads: int,
                 disabled_optimizers: tuple[str, ...] = ()):
        self.module, self.names = module, module.input_names
        self.sess = onnx_export.session(onnx_path, threads, disabled_optimizers) if onnx_path else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        inputs = self.module.example(batch)
        if self.sess is not None:
            return self.sess.run(None, {n: t.numpy() for n, t in zip(self.names, inputs)})
        with torch.no_grad():
            return [t.float().numpy() for t in self.module(*inputs)]
