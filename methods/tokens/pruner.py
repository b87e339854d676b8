"""Putting a token selector into a Hugging Face vision encoder, so the ONNX export traces it.

Forward hooks leave the weights and the module tree as they are (checkpoints save unchanged):
after block ``layer`` the selector keeps [CLS] and K patches in raster order, or the K tokens it
made for them (VisionZip), (+ one fused token), and the later blocks run on that shorter
sequence; their attention mask is dropped, because a
vision encoder attends to every token and the mask transformers materialises while tracing is
sized for the unpruned sequence. With ``output`` the encoder instead ends at ``layer``
(LLaVA-style, before the projector): the graph outputs the selected patch features and their
original indices (for position ids), and the exporter drops the blocks after it as dead code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.adapters import Adapter
from tasks.model import TOKEN_PRUNER, token_pruner

from .attention import global_attention
from .base import Method, Tap
from .select import fused_token, gather_rows

OUTPUT_NAMES = ("image_features", "token_index")


@dataclass(frozen=True)
class Placement:
    layer: int  # block index (0-based) whose output is pruned
    fuse: bool  # append one token averaging the dropped patches
    output: bool  # the encoder ends here and outputs the selected patches (LLaVA-style)
    object_layer: int | None = None  # HiPrune's object layer (its global attention picks the anchors)


class TokenPruner:
    """Hooks on one encoder (one pruner per model: installing another replaces it); a plain object,
    not a submodule, so it never enters a state dict."""

    def __init__(self, model: nn.Module, adapter: Adapter, method: Method, placement: Placement,
                 defaults: dict[str, torch.Tensor] | None = None, companions: tuple = ()):
        if token_pruner(model) is not None:
            token_pruner(model).remove()
        self.model, self.method, self.placement = model, method, placement
        layout = adapter.vision_tokens(model)
        self.prefix, self.cols, self.patches = layout.prefix, layout.cols, layout.patches
        blocks = adapter.vision_blocks(model)
        self.block = blocks[placement.layer]
        self.input_names: tuple[str, ...] = method.inputs
        # a VLM's projector reads the selected patches (`features`): the graph keeps the model's outputs
        self.output_names = OUTPUT_NAMES if placement.output and not adapter.projects_image_tokens else None
        self.defaults = defaults or {}  # graph inputs the data does not carry, per input [1, ...]
        self.companions = companions  # graphs exported next to model.onnx (TRIM's text encoder)
        self.last_index: torch.Tensor | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._object_score: torch.Tensor | None = None
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [self.block.module.register_forward_hook(self._after_block, with_kwargs=True)]
        if placement.object_layer is not None:
            obj = blocks[placement.object_layer]
            self._handles.append(obj.module.register_forward_pre_hook(self._object_hook(obj), with_kwargs=True))
        if not placement.output:
            for later in blocks[placement.layer + 1:]:
                self._handles.append(later.module.register_forward_pre_hook(_without_mask, with_kwargs=True))
        model.__dict__[TOKEN_PRUNER] = self

    @property
    def tokens_out(self) -> int:
        """Sequence length after the pruning block (inside) or of ``image_features`` (output)."""
        return (0 if self.placement.output else self.prefix) + self.method.k + int(self.placement.fuse)

    def describe(self) -> dict:
        return {"method": self.method.name, **asdict(self.placement), "patches": self.patches, "keep": self.method.k,
                "tokens_out": self.tokens_out}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.model.__dict__.pop(TOKEN_PRUNER, None)

    def run(self, forward: Callable[[], tuple], inputs: dict[str, torch.Tensor]) -> tuple:
        """Call ``forward`` (the task model) with the extra graph inputs bound; in ``output`` mode
        return (image_features, token_index) instead of its outputs."""
        self._inputs, self._features = inputs, None
        try:
            out = forward()
        finally:
            self._inputs, self._object_score = {}, None
        return self._features if self.output_names else out

    @property
    def features(self) -> torch.Tensor:
        """The selected patch features [B, K(+1), D] of the encoder's last pass (``output`` placement)."""
        if self._features is None:
            raise RuntimeError("no patches were selected: the vision tower has not run with an output placement")
        return self._features[0]

    def default(self, name: str, batch: int) -> torch.Tensor:
        return self.defaults[name].expand(batch, *self.defaults[name].shape[1:])

    def _object_hook(self, block):
        def hook(module, args, kwargs):
            self._object_score = global_attention(self.model, block, _hidden(args, kwargs), self.prefix)
        return hook

    def _after_block(self, module, args, kwargs, out):
        tap = Tap(self.model, self.block, _hidden(args, kwargs), out, self.prefix, self.cols, self._inputs,
                  self._object_score)
        idx, weights, tokens = self.method.select(tap)
        parts = [gather_rows(tap.patches, idx) if tokens is None else tokens]
        if self.placement.fuse:
            parts.append(fused_token(tap.patches, idx, weights))
        self.last_index = idx
        if self.placement.output:
            self._features = (torch.cat(parts, dim=1), idx)
            return None  # the encoder's own output is unchanged (and dead in the export)
        return torch.cat([out[:, :self.prefix], *parts], dim=1)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _without_mask(module, args, kwargs):
    if len(args) > 1:
        args = (args[0], None, *args[2:])
    if kwargs.get("attention_mask") is not None:
        kwargs = {**kwargs, "attention_mask": None}
    return args, kwargs
