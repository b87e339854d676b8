"""Intermediate-layer distillation (docs/methods/recovery.md, distillation): the hidden states that
leave chosen transformer blocks, captured by forward hooks, and the student's squared error to the
teacher's (Minitron, arXiv 2407.14679, matches intermediate states the same way).

Hooks rather than ``output_hidden_states``: the task's forward, and so the outputs its loss reads,
stay exactly what the model deploys, for every family whose blocks the adapter names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tasks.base import token_mse


@contextmanager
def block_outputs(blocks: dict[int, nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """While open, each forward pass stores what every block in ``blocks`` (index -> module) returns,
    by index: the hidden state after the block (the first element when it returns a tuple)."""
    states: dict[int, torch.Tensor] = {}

    def store(index: int):
        def hook(module: nn.Module, args, output) -> None:
            states[index] = output[0] if isinstance(output, tuple) else output
        return hook
    handles = [module.register_forward_hook(store(i)) for i, module in blocks.items()]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def layer_mse(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor],
              mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over the teacher's blocks of the per-token squared error over real tokens
    (`token_mse`, fp32): one weight in the recipe serves any number of chosen blocks."""
    return torch.stack([token_mse(student[i].float(), t.float(), mask) for i, t in teacher.items()]).mean()
