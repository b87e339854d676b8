"""Whether a structurally pruned model is an ordinary transformers checkpoint, and the config that says so.

A stock config describes every layer with one set of sizes (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``head_dim`` where the family reads it) and the
Linears' biases with family flags (Llama's ``attention_bias``/``mlp_bias``). When every block has
the same shape, the config with those sizes may build exactly this model; whether it does is
decided by building the stock model from it on the meta device and comparing every parameter's
name and shape, so no family rule is assumed here beyond the adapter's bias flags. A flag turns on
the biases of a whole group of Linears (q, k, v and o for ``attention_bias``); the ones the pruned
model does not have are saved as zeros, which changes no output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapters import Adapter, BlockShape, pretrained

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class PlainForm:
    """``config``: the config that builds this model (None when there is none, and ``reason`` says why);
    ``zero_biases``: parameter names the stock model has and this one lacks (biases saved as zeros)."""

    config: PretrainedConfig | None
    zero_biases: tuple[str, ...] = ()
    reason: str | None = None
    blocker: str | None = None  # "layers" | "sizes" | "bias": what stands in the way

    @property
    def plain(self) -> bool:
        return self.config is not None


def plain_form(model: nn.Module, adapter: Adapter) -> PlainForm:
    """The plain-transformers form of ``model``, or why it has none."""
    hf = pretrained(model)
    blocks = adapter.blocks(model)
    shapes = [adapter.shape(model, b) for b in blocks]
    if len(set(shapes)) > 1:
        kinds = sorted({f"{s.num_heads}/{s.num_kv_heads}/{s.intermediate_size}" for s in shapes})
        return PlainForm(None, reason=f"its layers differ in shape (heads/KV heads/MLP width: {', '.join(kinds)}), "
                                      "which one config cannot describe", blocker="layers")
    changed = _heads_changed(adapter.block_config(hf.config), shapes[0])
    config = _sized_config(hf.config, shapes[0], blocks[0].head_dim, adapter, changed)
    try:
        with torch.device("meta"):
            stock = type(hf)._from_config(config)
    except ValueError as e:  # a config the family refuses (BERT: hidden size not a multiple of the heads)
        return PlainForm(None, reason=f"a {config.model_type} config with these sizes is refused ({e})", blocker="sizes")
    ours = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    for name, shape in ours.items():
        if name not in theirs:
            what = "bias" if name.endswith(".bias") else "sizes"
            return PlainForm(None, reason=f"a {config.model_type} config cannot give {name.removesuffix('.bias')} "
                                          f"a bias", blocker=what)
        if theirs[name] != shape:
            return PlainForm(None, reason=f"a {config.model_type} config builds {name} as {list(theirs[name])}, "
                                          f"not {list(shape)}", blocker="sizes")
    extra = tuple(k for k in theirs if k not in ours)
    odd = [k for k in extra if not k.endswith(".bias")]
    if odd:
        return PlainForm(None, reason=f"a {config.model_type} config adds {odd[0]}, which this model lacks",
                         blocker="sizes")
    return PlainForm(config, extra)


def _heads_changed(config, shape: BlockShape) -> bool:
    return shape.num_heads != config.num_attention_heads


def _sized_config(config: Any, shape: BlockShape, head_dim: int, adapter: Adapter, heads_changed: bool):
    """A copy of ``config`` with the block sizes of ``shape``: ``head_dim`` is written whenever the head
    count changed, since most families derive it (and the rotary width) from hidden size / heads."""
    outer = config = copy.deepcopy(config)
    if hasattr(config, "edgeprune_structure"):
        del config.edgeprune_structure
    config = adapter.block_config(outer)
    config.num_attention_heads = shape.num_heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = shape.num_kv_heads
    config.intermediate_size = shape.intermediate_size
    if heads_changed:
        config.head_dim = head_dim
    for flag, has_bias in zip(adapter.bias_flags, (shape.o_bias, shape.mlp_out_bias)):
        if flag is not None and has_bias:
            setattr(config, flag, True)
    return outer
