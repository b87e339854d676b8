"""A causal LM with its KV cache as explicit tensors: the module the prefill and decode graphs come from.

ONNX has no state, so the cache is graph input and output: per layer ``past_key_values.{i}.key``
and ``.value`` of fixed shape [B, kv_heads_i, max_len, head_dim] in, the same tensors with this
call's keys and values written at ``cache_position`` out (``present.{i}.key``/``.value``). One
module serves both graphs; only the number of tokens differs (the recipe's ``seq_len`` for the
prefill graph, one for the decode graph). The transformers model itself runs unchanged: its
attention layers hand their new keys and values to a cache object, which here writes them into
the input tensors out of place (``index_copy``: one ScatterND per tensor in the graph, nothing
grows), and the additive mask built from the positions lets query s see slot j only when
j <= cache_position[s]. So a right-padded prompt and the decode steps after it never read a stale
slot, and a layer keeps its own KV head count after structured pruning
(docs/methods/decoder-export.md).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from core.errors import RecipeError
from models.adapters import Adapter, pretrained
from models.spec import ModelSpec

from .model import TaskModel
from .registry import TASKS

STEP_INPUTS = ("input_ids", "position_ids", "cache_position")
PAST, PRESENT = "past_key_values", "present"  # cache tensors are named <prefix>.<layer>.key / .value


def is_cache(name: str) -> bool:
    return name.startswith((f"{PAST}.", f"{PRESENT}."))


def _cache_names(prefix: str, layers: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))


class _SlotLayer(CacheLayerMixin):
    """One layer's cache: the tensors given, with new keys and values written at fixed slots.

    transformers' StaticLayer writes in place at a running offset kept in the object, which an
    exported graph cannot carry from one call to the next; here the slots are an input."""

    is_compileable = True  # fixed shapes: transformers builds no dynamic-length mask for it
    is_sliding = False
    keys: torch.Tensor  # never None here, unlike a lazily initialised transformers layer
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.slots = keys, values, slots
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never needed: the tensors exist before the first update."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) \
            -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.keys.index_copy(2, self.slots, key_states.to(self.keys.dtype))
        self.values = self.values.index_copy(2, self.slots, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def visible(cache_position: torch.Tensor, max_len: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S, max_len] additive mask: query s sees slot j iff j <= cache_position[s]."""
    seen = torch.arange(max_len, device=cache_position.device)[None, :] <= cache_position[:, None]
    bias = torch.where(seen, 0.0, torch.finfo(dtype).min).to(dtype)
    return bias[None, None].expand(batch, 1, -1, -1)


def check_decoder(model: nn.Module, adapter: Adapter, task: str, max_len: int, field: str) -> None:
    """Before any work: the task generates, the family's attention goes through the cache object, and
    no sliding window is shorter than the cache (the explicit mask would widen it)."""
    if not TASKS[task].generates:
        raise RecipeError(f"task {task!r} does not generate text; decoder graphs are for causal-lm and "
                          "image-text-to-text", field=field)
    if not adapter.static_kv_cache:
        raise RecipeError(f"{adapter.family} models have no static KV-cache export; families that do: llama (llama, "
                          "qwen2, mistral), qwen3, phi3", field=field)
    window = getattr(pretrained(model).config, "sliding_window", None)
    if window and max_len > window:
        raise RecipeError(f"max_len {max_len} exceeds the model's sliding attention window ({window}); use at most "
                          f"{window}", field=f"{field}.max_len")


class CachedDecoder(TaskModel):
    """The causal LM as the two decoder graphs deploy it.

    Positional inputs (input_ids [B, S], position_ids [B, S], cache_position [S], then every
    layer's past key and value); outputs logits [B, S, V] and every layer's present key and value.
    ``position_ids`` feed the rotary embedding and ``cache_position`` the slots written and the mask;
    they are equal here and apart only where positions are not slots (token pruning's kept ids).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, adapter: Adapter, max_len: int):
        super().__init__(model, spec)
        self.max_len = max_len
        self.layout = [(b.num_kv_heads, b.head_dim) for b in adapter.blocks(model)]
        self.input_names = (*STEP_INPUTS, *_cache_names(PAST, len(self.layout)))
        self.output_names = (self.task.output_names[0], *_cache_names(PRESENT, len(self.layout)))

    def logits(self, tokens: dict[str, torch.Tensor], **kw) -> torch.Tensor:
        """The model's logits for one call (``kw``: positions, mask, cache)."""
        return self.model(**tokens, **kw).logits

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        return [torch.zeros(batch, heads, self.max_len, dim, dtype=dtype) for heads, dim in self.layout for _ in "kv"]

    def example(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Prefill inputs for a batch of token windows: positions from 0, an empty cache."""
        ids = inputs["input_ids"]
        batch, length = ids.shape
        pos = torch.arange(length)
        return (ids, pos.repeat(batch, 1), pos, *self.empty_cache(batch))

    def step(self, prefill: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Decode inputs that continue ``prefill``: its cache (computed here), its greedy next token at the
        next position. What the decode graph is exported and checked on."""
        with torch.no_grad():
            logits, *cache = self(*prefill)
        nxt = int(prefill[2][-1]) + 1
        batch = logits.shape[0]
        return (logits[:, -1:].argmax(-1), torch.full((batch, 1), nxt), torch.tensor([nxt]), *cache)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, cache_position, *past = inputs
        return self.cached({"input_ids": input_ids}, position_ids, cache_position, past)

    def cached(self, tokens: dict[str, torch.Tensor], position_ids: torch.Tensor, cache_position: torch.Tensor,
               past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One call over the cache; ``tokens`` is {"input_ids": ...} or {"inputs_embeds": ...} (a VLM's prefill)."""
        layers = [_SlotLayer(past[2 * i], past[2 * i + 1], cache_position) for i in range(len(past) // 2)]
        mask = visible(cache_position, self.max_len, position_ids.shape[0], past[0].dtype)
        logits = self.logits(tokens, position_ids=position_ids, attention_mask=mask, cache=Cache(layers=[*layers]),
                             use_cache=True)
        return (logits, *(t for layer in layers for t in (layer.keys, layer.values)))
