"""What every method needs to know about a transformer family, in one place.

A `Block` names, by full module path, the four attention projections, the MLP projections whose
output rows are MLP channels (``mlp_in``: gate/up, fc1, intermediate.dense) and the projection
whose input columns are MLP channels (``mlp_out``: down, fc2, output.dense). Head counts and widths
are read from the current weight shapes, so they stay true after structured pruning changed a layer.

Projections that read the same input may share one fused Linear (Phi-3's ``qkv_proj`` holds q, k
and v, its ``gate_up_proj`` gate and up): a family says so by naming the same Linear for several
projections, and each `Projection` then carries the output rows it owns. ``Block.linears`` lists
every physical Linear once, which is what calibration, weight pruning and quantization hook.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def linear(model: nn.Module, name: str) -> nn.Linear:
    """The Linear at ``name``: what adapters address by name (`get_submodule` promises only a Module)."""
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}, not the Linear its adapter expects")
    return module


def pretrained(model: nn.Module) -> PreTrainedModel:
    """``model`` as the transformers model it is: what its config and hub methods are read from."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"a transformers PreTrainedModel is needed, got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class VisionTokens:
    """A vision encoder's sequence: ``prefix`` leading tokens ([CLS]), then a row-major grid of patches."""

    prefix: int
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.rows * self.cols

    @classmethod
    def square_grid(cls, config, prefix: int) -> VisionTokens:
        """The layout of a vision config with square images and patches."""
        rows = config.image_size // config.patch_size
        return cls(prefix=prefix, rows=rows, cols=rows)


class Projection(str):
    """One logical projection: the full name of the Linear computing it (the string itself) and,
    when that Linear is fused with other projections, the ``rows`` [start, stop) of its outputs
    that are this projection's (None: all of them).

    A str so that everything addressing Linears by name (hooks, statistics, weight pruning) works
    unchanged; what needs this projection's own outputs (head slicing, token scores) uses ``rows``.
    """

    rows: tuple[int, int] | None

    def __new__(cls, name: str, rows: tuple[int, int] | None = None):
        self = super().__new__(cls, name)
        self.rows = rows
        return self

    def __repr__(self) -> str:
        return f"Projection({str(self)!r}, rows={self.rows})"

    @property
    def start(self) -> int:
        return self.rows[0] if self.rows else 0

    def apply(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """This projection's output for ``x`` (the whole Linear when it is not fused)."""
        layer = linear(model, self)
        if self.rows is None:
            return layer(x)
        rows = slice(*self.rows)
        return F.linear(x, layer.weight[rows], layer.bias[rows] if layer.bias is not None else None)


def _stack(model: nn.Module, names: list[str], widths: list[int]) -> list[Projection]:
    """Projections for ``names`` in order; several naming one Linear take consecutive row ranges of
    the given widths, which must fill it (a layout this cannot describe fails here, not later)."""
    start: dict[str, int] = {}
    out = []
    for name, width in zip(names, widths):
        a = start.get(name, 0)
        start[name] = a + width
        out.append(Projection(name, (a, a + width) if names.count(name) > 1 else None))
    for name, used in start.items():
        if names.count(name) > 1 and used != linear(model, name).out_features:
            raise ValueError(f"fused {name}: parts of widths {widths} do not fill its "
                             f"{linear(model, name).out_features} outputs")
    return out


def _once(*names: str) -> tuple[str, ...]:
    """Plain names, each once, in order."""
    return tuple(dict.fromkeys(str(n) for n in names))


@dataclass(frozen=True)
class Block:
    index: int
    prefix: str
    module: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: str  # read by input column (query-head channels); never fused
    mlp_in: tuple[Projection, ...]
    mlp_out: str  # read by input column (MLP channels); never fused
    head_dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    attn_norm: str | None = None  # the LayerNorm whose output feeds q/k/v (pre-norm blocks only)

    @property
    def qkv_linears(self) -> tuple[str, ...]:
        """The physical Linears computing q, k and v (one when fused)."""
        return _once(self.q, self.k, self.v)

    @property
    def mlp_in_linears(self) -> tuple[str, ...]:
        return _once(*self.mlp_in)

    @property
    def attn_linears(self) -> tuple[str, ...]:
        """The attention's physical Linears, each once, in execution order."""
        return (*self.qkv_linears, self.o)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return (*self.mlp_in_linears, self.mlp_out)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every physical Linear of the block once, in execution order."""
        return self.attn_linears + self.mlp_linears


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
    old = linear(model, name)
    w = old.weight.data
    b = old.bias.data if old.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    if add_bias is not None:
        b = (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)) + add_bias.to(w.dtype)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.train(old.training)
    parent, child = _parent(model, name)
    setattr(parent, child, new)


def _slice_rows(model: nn.Module, kept: list[tuple[Projection, torch.Tensor]]) -> None:
    """Keep, of each projection, its ``kept`` rows (relative to the projection); projections sharing
    a Linear are sliced together, in their order."""
    rows: dict[str, list[torch.Tensor]] = {}
    for proj, local in kept:
        rows.setdefault(str(proj), []).append(local + proj.start)
    for name, parts in rows.items():
        _slice_linear(model, name, rows=parts[0] if len(parts) == 1 else torch.cat(parts))


def _set_sizes(module: nn.Module, **sizes: int) -> None:
    """Update the size attributes a sliced layer keeps (which ones it has varies by family)."""
    for attr, value in sizes.items():
        if hasattr(module, attr):
            setattr(module, attr, value)


def head_channels(heads, head_dim: int) -> torch.Tensor:
    """Channel indices of the given heads: head h owns [h*hd, (h+1)*hd)."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


class LayerConfig:
    """The model config as one structurally pruned layer sees it: its own sizes, the rest shared.

    For layers whose forward reads sizes from ``self.config`` (Phi-3's attention splits qkv at
    ``config.num_attention_heads * head_dim``). It delegates instead of copying so later changes to
    the shared config (the attention implementation, say) still reach the layer; nothing in
    transformers is patched.
    """

    def __init__(self, shared, **own):
        self._shared = shared
        self.__dict__.update(own)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_shared":  # copy/pickle probe dunders before _shared is set
            raise AttributeError(name)
        return getattr(self._shared, name)


def own_config(module: nn.Module, **sizes) -> None:
    """Give ``module`` a `LayerConfig` with ``sizes`` (replacing any earlier one's)."""
    shared = getattr(module.config, "_shared", module.config)
    # torch types Module attribute assignment as Tensor | Module; nn.Module.__setattr__ takes any value
    module.config = LayerConfig(shared, **sizes)  # type: ignore[assignment]


FAMILIES: list[Adapter] = []  # filled by @register as models/adapters/ imports its modules


def register(cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class (one instance serves every model of its ``model_types``)."""
    FAMILIES.append(cls())
    return cls


class Adapter:
    """Base class: subclasses set the class attributes and, if needed, override `head_dim`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    tasks: ClassVar[tuple[str, ...]]
    block_list: ClassVar[str]  # regex matching the full name of the ModuleList of blocks
    # q, k, v, o relative to a block; q/k/v naming one Linear share it, stacked in that order.
    attn: ClassVar[tuple[str, str, str, str]]
    mlp_in: ClassVar[tuple[str, ...]]  # likewise: gate and up naming one Linear are its two halves
    mlp_out: ClassVar[str]
    # Pre-norms relative to a block: the one feeding q/k/v and the one feeding mlp_in. None for
    # post-norm families (BERT), whose norm output is also the residual stream.
    norms: ClassVar[tuple[str, str] | None] = None
    # The norms compute x_hat * (offset + weight): 1 for Gemma's RMSNorm, so scales fold into
    # (offset + weight), not into the stored weight.
    norm_offset: ClassVar[float] = 0.0
    # Config flags that give (o, mlp_out) a bias, each with the rest of its group (Llama's attention_bias
    # adds q/k/v/o biases): how a plain config describes bias compensation (models/plain.py).
    bias_flags: ClassVar[tuple[str | None, str | None]] = (None, None)
    # Every attention layer hands its keys and values to the model's cache object and reads the 4D mask
    # given to the model: what the static KV-cache decoder export relies on (tasks/decoder.py).
    static_kv_cache: ClassVar[bool] = False
    # A vision-language model: token pruning's selected patches go on through its projector into the
    # language model instead of ending the graph (models/adapters/llava.py, tasks/image_text.py).
    projects_image_tokens: ClassVar[bool] = False

    def layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The (name, ModuleList) holding the transformer blocks."""
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and re.search(self.block_list, n)]
        if len(found) != 1:
            raise ValueError(f"{self.family} adapter expected one block list matching {self.block_list!r}, "
                             f"found {[n for n, _ in found]}")
        return found[0]

    def head_dim(self, model: nn.Module) -> int:
        cfg = pretrained(model).config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def towers(self, model: nn.Module) -> dict[str, list[Block]]:
        """The model's block stacks, by the name of their ModuleList.

        One stack for every family so far (CLIP's task picks its tower before loading); a
        vision-language adapter returns one per tower, each with its own sizes.
        """
        name, layers = self.layers(model)
        return {name: [self._block(model, f"{name}.{i}", i, layer) for i, layer in enumerate(layers)]}

    def vision_blocks(self, model: nn.Module) -> list[Block]:
        """The blocks token pruning selects in: the model's own for a vision encoder, the vision tower's
        for a vision-language model."""
        return self.blocks(model)

    def blocks(self, model: nn.Module) -> list[Block]:
        """The blocks of a one-tower model: what the stages calibrate and prune."""
        towers = self.towers(model)
        if len(towers) != 1:
            raise ValueError(f"{self.family} model has towers {list(towers)}; pick one with towers()")
        return next(iter(towers.values()))

    def _block(self, model: nn.Module, prefix: str, index: int, layer: nn.Module) -> Block:
        """Sizes come from the Linears read by input column (o, mlp_out), which are never fused,
        and KV heads from what the query rows leave of k's Linear."""
        hd = self.head_dim(model)
        q, k, v, o = (f"{prefix}.{p}" for p in self.attn)
        mlp_in = [f"{prefix}.{p}" for p in self.mlp_in]
        mlp_out = f"{prefix}.{self.mlp_out}"
        heads = linear(model, o).in_features // hd
        inter = linear(model, mlp_out).in_features
        kv_rows = linear(model, k).out_features - (heads * hd if q == k else 0)
        kv_heads = kv_rows // ((1 + (v == k)) * hd)
        q, k, v = _stack(model, [q, k, v], [heads * hd, kv_heads * hd, kv_heads * hd])
        return Block(
            index=index, prefix=prefix, module=layer, q=q, k=k, v=v, o=o,
            mlp_in=tuple(_stack(model, mlp_in, [inter] * len(mlp_in))), mlp_out=mlp_out,
            head_dim=hd, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=inter,
            attn_norm=f"{prefix}.{self.norms[0]}" if self.norms else None,
        )

    def shape(self, model: nn.Module, block: Block) -> BlockShape:
        return BlockShape(block.num_heads, block.num_kv_heads, block.intermediate_size,
                          linear(model, block.o).bias is not None,
                          linear(model, block.mlp_out).bias is not None)

    def slice_block(self, model: nn.Module, block: Block, heads, kv_heads, channels,
                    o_bias: torch.Tensor | None = None, mlp_bias: torch.Tensor | None = None) -> None:
        """Keep query ``heads``, ``kv_heads`` and MLP ``channels`` (sorted indices) of ``block``.

        Dependency-aware: q rows and o columns by query head, k/v rows by KV head, MLP input-side
        rows and output-side columns by channel, biases alongside. A fused Linear keeps, for each
        projection it holds, that projection's rows within its own range, so the layout stays
        [q | k | v] and [gate | up] with equal halves. ``o_bias``/``mlp_bias`` are
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
        _slice_rows(model, [(block.q, q_cols), (block.k, kv_rows), (block.v, kv_rows)])
        _slice_linear(model, block.o, cols=q_cols, add_bias=o_bias)
        _slice_rows(model, [(p, ch) for p in block.mlp_in])
        _slice_linear(model, block.mlp_out, cols=ch, add_bias=mlp_bias)
        _set_sizes(_parent(model, block.q)[0], num_heads=len(heads), num_attention_heads=len(heads),
                   num_key_value_heads=len(kv_heads), num_key_value_groups=g_new, all_head_size=len(heads) * hd)
        _set_sizes(_parent(model, block.mlp_out)[0], intermediate_size=len(channels))

    def reshape_block(self, model: nn.Module, block: Block, shape: BlockShape) -> None:
        """Give a freshly built block the sizes of a saved one (its weights are loaded next)."""
        hidden = linear(model, block.o).out_features
        g = shape.num_heads // shape.num_kv_heads
        g_old = block.num_heads // block.num_kv_heads
        heads = [k * g_old + j for k in range(shape.num_kv_heads) for j in range(g)]
        device = linear(model, block.o).weight.device  # meta when checking a recipe against the model's structure
        o_bias = torch.zeros(hidden, device=device) if shape.o_bias and linear(model, block.o).bias is None else None
        mlp_bias = (torch.zeros(hidden, device=device) if shape.mlp_out_bias and linear(model, block.mlp_out).bias is None
                    else None)
        self.slice_block(model, block, heads, range(shape.num_kv_heads), range(shape.intermediate_size),
                         o_bias, mlp_bias)

    def block_config(self, config):
        """The (sub-)config whose sizes describe `blocks`: the config itself, a VLM's text config."""
        return config

    def input_embedding(self, model: nn.Module) -> nn.Module:
        """The module whose output feeds block 0 (its output is made to require grad for gradients)."""
        return pretrained(model).get_input_embeddings()

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
            out.append((f"{b.prefix}.{self.norms[0]}", b.qkv_linears))
            out.append((f"{b.prefix}.{self.norms[1]}", b.mlp_in_linears))
        return out
