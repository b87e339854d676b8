"""What every method needs to know about a transformer family, in one place.

A `Block` names, by full module path, the four attention projections, the MLP projections whose
output rows are MLP channels (``mlp_in``: gate/up, fc1, intermediate.dense) and the projection
whose input columns are MLP channels (``mlp_out``: down, fc2, output.dense). Head counts and widths
are read from the current weight shapes, so they stay true after structured pruning changed a layer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class VisionTokens:
    """A vision encoder's sequence: ``prefix`` leading tokens ([CLS]), then a row-major grid of patches."""

    prefix: int
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.rows * self.cols


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
    attn_norm: str | None = None  # the LayerNorm whose output feeds q/k/v (pre-norm blocks only)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every projection of the block, in execution order."""
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)


@dataclass(frozen=True)
class BlockShape:
    """A block's own sizes after structured pruning: what a stock config cannot express."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    o_bias: bool
    mlp_out_bias: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


def _slice_linear(model: nn.Module, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  add_bias: torch.Tensor | None = None) -> None:
    """Replace Linear ``name`` by one holding only ``rows`` (outputs) and ``cols`` (inputs).

    ``add_bias`` is added to the (sliced) bias, creating the bias if the layer had none.
    """
    old = model.get_submodule(name)
    w = old.weight.data
    b = old.bias.data if old.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    if add_bias is not None:
        b = (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)) + add_bias.to(w.dtype)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.train(old.training)
    parent, child = _parent(model, name)
    setattr(parent, child, new)


def head_channels(heads, head_dim: int) -> torch.Tensor:
    """Channel indices of the given heads: head h owns [h*hd, (h+1)*hd)."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


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
                attn_norm=f"{prefix}.{self.norms[0]}" if self.norms else None,
            ))
        return out

    def shape(self, model: nn.Module, block: Block) -> BlockShape:
        return BlockShape(block.num_heads, block.num_kv_heads, block.intermediate_size,
                          model.get_submodule(block.o).bias is not None,
                          model.get_submodule(block.mlp_out).bias is not None)

    def slice_block(self, model: nn.Module, block: Block, heads, kv_heads, channels,
                    o_bias: torch.Tensor | None = None, mlp_bias: torch.Tensor | None = None) -> None:
        """Keep query ``heads``, ``kv_heads`` and MLP ``channels`` (sorted indices) of ``block``.

        Dependency-aware: q rows and o columns by query head, k/v rows by KV head, MLP input-side
        rows and output-side columns by channel, biases alongside. ``o_bias``/``mlp_bias`` are
        added to the output projections' biases (bias compensation; created where absent).
        With grouped-query attention every kept KV head must keep the same number of query heads,
        contiguous and in order, because HF's repeat_kv maps query head j to KV head j // g.
        """
        heads, kv_heads, channels = sorted(heads), sorted(kv_heads), sorted(channels)
        if not heads or not channels or len(heads) % len(kv_heads):
            raise ValueError(f"block {block.index}: {len(heads)} heads, {len(kv_heads)} KV heads, "
                             f"{len(channels)} channels is not a valid structure")
        g_old, g_new = block.num_heads // block.num_kv_heads, len(heads) // len(kv_heads)
        if [h // g_old for h in heads] != [kv_heads[i // g_new] for i in range(len(heads))]:
            raise ValueError(f"block {block.index}: query heads {heads} do not split evenly over KV heads {kv_heads}")
        hd = block.head_dim
        q_cols, kv_rows = head_channels(heads, hd), head_channels(kv_heads, hd)
        ch = torch.as_tensor(channels, dtype=torch.long)
        _slice_linear(model, block.q, rows=q_cols)
        _slice_linear(model, block.k, rows=kv_rows)
        _slice_linear(model, block.v, rows=kv_rows)
        _slice_linear(model, block.o, cols=q_cols, add_bias=o_bias)
        for name in block.mlp_in:
            _slice_linear(model, name, rows=ch)
        _slice_linear(model, block.mlp_out, cols=ch, add_bias=mlp_bias)
        attention = _parent(model, block.q)[0]
        for attr, value in (("num_heads", len(heads)), ("num_attention_heads", len(heads)),
                            ("num_key_value_heads", len(kv_heads)), ("num_key_value_groups", g_new),
                            ("all_head_size", len(heads) * hd)):
            if hasattr(attention, attr):
                setattr(attention, attr, value)
        mlp = _parent(model, block.mlp_out)[0]
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)

    def reshape_block(self, model: nn.Module, block: Block, shape: BlockShape) -> None:
        """Give a freshly built block the sizes of a saved one (its weights are loaded next)."""
        hidden = model.get_submodule(block.o).out_features
        g = shape.num_heads // shape.num_kv_heads
        g_old = block.num_heads // block.num_kv_heads
        heads = [k * g_old + j for k in range(shape.num_kv_heads) for j in range(g)]
        o_bias = torch.zeros(hidden) if shape.o_bias and model.get_submodule(block.o).bias is None else None
        mlp_bias = torch.zeros(hidden) if shape.mlp_out_bias and model.get_submodule(block.mlp_out).bias is None else None
        self.slice_block(model, block, heads, range(shape.num_kv_heads), range(shape.intermediate_size),
                         o_bias, mlp_bias)

    def input_embedding(self, model: nn.Module) -> nn.Module:
        """The module whose output feeds block 0 (its output is made to require grad for gradients)."""
        return model.get_input_embeddings()

    def vision_tokens(self, model: nn.Module) -> VisionTokens | None:
        """The token layout of a vision encoder (None for text models): what token pruning selects from."""
        return None

    def joint_space(self, model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """(final norm, projection) that map vision tokens into an image-text embedding space, if the model has one."""
        return None

    def smoothing_groups(self, model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
        """(norm, the Linears that read only its output): where SmoothQuant can fold 1/s into a norm."""
        if self.norms is None:
            return []
        out = []
        for b in self.blocks(model):
            out.append((f"{b.prefix}.{self.norms[0]}", (b.q, b.k, b.v)))
            out.append((f"{b.prefix}.{self.norms[1]}", b.mlp_in))
        return out
