"""What every method needs to know about a transformer family, in one place.

A `Block` names, by full module path, the four attention projections, the MLP projections whose
output rows are MLP channels (``mlp_in``: gate/up, fc1, intermediate.dense) and the projection
whose input columns are MLP channels (``mlp_out``: down, fc2, output.dense). Head counts and widths
are read from the current weight shapes, so they stay true after structured pruning changed a layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from torch import nn


@dataclass(frozen=True)
class Block:
    index: int
    prefix: str
    module: nn.Module
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def linears(self) -> tuple[str, ...]:
        """Every projection of the block, in execution order."""
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)


class Adapter:
    """Base class: subclasses set the class attributes and, if needed, override `head_dim`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    tasks: ClassVar[tuple[str, ...]]
    block_list: ClassVar[str]  # regex matching the full name of the ModuleList of blocks
    attn: ClassVar[tuple[str, str, str, str]]  # q, k, v, o relative to a block
    mlp_in: ClassVar[tuple[str, ...]]
    mlp_out: ClassVar[str]
    # Pre-norms relative to a block: the one feeding q/k/v and the one feeding mlp_in. None for
    # post-norm families (BERT), whose norm output is also the residual stream.
    norms: ClassVar[tuple[str, str] | None] = None

    def layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The (name, ModuleList) holding the transformer blocks."""
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and re.search(self.block_list, n)]
        if len(found) != 1:
            raise ValueError(f"{self.family} adapter expected one block list matching {self.block_list!r}, found {[n for n, _ in found]}")
        return found[0]

    def head_dim(self, model: nn.Module) -> int:
        cfg = model.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def blocks(self, model: nn.Module) -> list[Block]:
        name, layers = self.layers(model)
        hd = self.head_dim(model)
        out = []
        for i, layer in enumerate(layers):
            prefix = f"{name}.{i}"
            q, k, v, o = (f"{prefix}.{p}" for p in self.attn)
            mlp_in = tuple(f"{prefix}.{p}" for p in self.mlp_in)
            mlp_out = f"{prefix}.{self.mlp_out}"
            out.append(Block(
                index=i, prefix=prefix, module=layer, q=q, k=k, v=v, o=o, mlp_in=mlp_in, mlp_out=mlp_out,
                head_dim=hd,
                num_heads=model.get_submodule(q).out_features // hd,
                num_kv_heads=model.get_submodule(k).out_features // hd,
                intermediate_size=model.get_submodule(mlp_out).in_features,
            ))
        return out

    def input_embedding(self, model: nn.Module) -> nn.Module:
        """The module whose output feeds block 0 (its output is made to require grad for gradients)."""
        return model.get_input_embeddings()

    def smoothing_groups(self, model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
        """(norm, the Linears that read only its output): where SmoothQuant can fold 1/s into a norm."""
        if self.norms is None:
            return []
        out = []
        for b in self.blocks(model):
            out.append((f"{b.prefix}.{self.norms[0]}", (b.q, b.k, b.v)))
            out.append((f"{b.prefix}.{self.norms[1]}", b.mlp_in))
        return out
