"""`TaskModel`: the model as deployed, the single definition of a task's graph inputs and outputs.

Export, the ONNX parity check and evaluation all run it, so "the embedding" means the same thing
everywhere. A token pruner the token_prune stage put on the model (methods/tokens/pruner.py)
plugs in through `TOKEN_PRUNER` and the `TokenPrunerHook` protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from models.spec import ModelSpec

from .registry import TASKS

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
    """The model as deployed: positional tensor inputs in the task's ``input_names`` order, outputs as named.

    A token pruner on the model (stage token_prune) may add inputs (TRIM's text embedding) and,
    when it ends the encoder, replace the outputs with (image_features, token_index).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.task, self.spec = model, TASKS[spec.task], spec
        self.tokens = token_pruner(model)
        self.input_names, self.output_names = self.task.input_names, self.task.output_names
        if self.tokens is not None:
            self.input_names += self.tokens.input_names
            self.output_names = self.tokens.output_names or self.output_names

    def example(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Positional inputs for a data batch; inputs data does not carry come from the token pruner."""
        inputs = self.task.graph_inputs(self.model, inputs)
        batch = next(iter(inputs.values())).shape[0]
        return tuple(inputs[n] if n in inputs else self._default(n, batch) for n in self.input_names)

    def _default(self, name: str, batch: int) -> torch.Tensor:
        """An input data does not carry (TRIM's text embedding): only a token pruner has one."""
        if self.tokens is None:
            raise KeyError(f"the batch has no input {name!r} and no token pruner supplies it")
        return self.tokens.default(name, batch)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kw = dict(zip(self.input_names, inputs))
        if self.tokens is None:
            return self.task.forward(self.model, kw, self.spec)
        extra = {n: kw.pop(n) for n in self.tokens.input_names}
        return self.tokens.run(lambda: self.task.forward(self.model, kw, self.spec), extra)
