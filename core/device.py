"""The run's compute device (the recipe's top-level ``device``, or ``run --device``).

One setting for the whole run, not one per stage: the model is placed once after loading, and every
stage works where its weights are (`module_device`). ``cpu`` is the default and the tested path;
``cuda`` / ``cuda:N`` are written against torch's documented device API and checked here before
any work starts, so a machine without a usable GPU fails with one line instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import EnvironmentFailure


def resolve(value: str, field: str = "device") -> torch.device:
    """The torch device ``value`` asks for, on this machine. Asking for a GPU that torch cannot use is
    the machine's fault, not the recipe's: `EnvironmentFailure` (exit 1), naming the field and the fix."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(value)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise EnvironmentFailure(f"'{value}' asked for, but torch sees no CUDA GPU here (torch.cuda.is_available() "
                                 "is false): use device: cpu (or run --device cpu), or run on a machine with an "
                                 "NVIDIA GPU and a CUDA build of torch", field=field)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise EnvironmentFailure(f"'{value}' asked for, but torch sees {count} CUDA GPU(s), cuda:0 to "
                                 f"cuda:{count - 1}: pick one of those", field=field)
    return device


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s weights are: the device anything computed from them is created on."""
    return next(iter(module.parameters())).device


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of model inputs on ``device`` (batches stay on the CPU, where their digests are taken)."""
    return {k: v.to(device) for k, v in tensors.items()}


@contextmanager
def on_cpu(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` on the CPU while open, then back where it was: checkpoints are written from CPU
    tensors, so a GPU run's files have the same form (tied weights stay shared) as a CPU run's."""
    device = module_device(module)
    module.cpu()
    try:
        yield module
    finally:
        module.to(device)
