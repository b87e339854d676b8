"""Running the deployed model on a batch, through ONNX Runtime (the file that ships) or PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.device import module_device
from export import onnx as onnx_export
from tasks import TaskModel


class Runner:
    """Runs a batch (the model's keyword inputs) through ONNX Runtime or PyTorch and returns numpy outputs:
    a tasks.metrics `Run`.

    ONNX Runtime runs on ``runtime``'s providers (export/onnx.py RUNTIMES). ``sess.run`` with inputs and
    outputs in host memory is synchronous on every provider: it copies the inputs to the GPU, runs, and
    returns only once the outputs are back on the CPU, so a wall-clock time around a call (evaluation/
    latency.py) measures the whole GPU round trip with no further synchronisation. PyTorch runs where
    the module's weights are; the outputs come back to the CPU the same way.
    """

    def __init__(self, module: TaskModel, onnx_path: Path | None, threads: int,
                 disabled_optimizers: tuple[str, ...] = (), runtime: str = "cpu"):
        self.module, self.names = module, module.input_names
        self.sess = onnx_export.session(onnx_path, threads, disabled_optimizers, runtime) if onnx_path else None

    @property
    def providers(self) -> list[str]:
        """The execution providers the session runs on, best first (what measured the latency)."""
        return self.sess.get_providers() if self.sess is not None else []

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        inputs = self.module.example(batch)
        if self.sess is not None:
            return self.sess.run(None, {n: t.numpy() for n, t in zip(self.names, inputs)})
        device = module_device(self.module)
        with torch.no_grad():
            return [t.float().cpu().numpy() for t in self.module(*(t.to(device) for t in inputs))]
