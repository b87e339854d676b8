"""A VLM as three deployed graphs: the vision graph, and the decoder graphs with an image-aware prefill.

``vision.onnx``: pixel_values [B, 3, H, W] -> image_embeds [B, K, hidden], the projected image
tokens (after token pruning when a token_prune stage put a selector at the feature layer), K fixed.
The selector's own inputs follow pixel_values (random's ``keep_idx``, TRIM's ``text_embeds``), so
the host chooses them per image and question.
``model.onnx`` (prefill): the causal LM's prefill graph (tasks/decoder.py) with one more input,
``image_embeds``, spliced in where ``input_ids`` holds the image placeholder (Gather and Where, as
the task model does); ``decode.onnx``: the causal LM's one-token graph, unchanged, since decode
steps read text tokens only.

Why the splice is in the prefill graph rather than the host feeding ``inputs_embeds``: the decode
graph keeps its ``input_ids`` input and the embedding table stays inside the graphs (one copy, in
the shared weight file) instead of shipping it a second time for the host; the host only sends ids
and the vision graph's output. A prompt must fit one prefill window (its image tokens are counted
from the window's start).
"""

from __future__ import annotations

import torch
from torch import nn

from models.adapters import Adapter, pretrained
from models.spec import ModelSpec

from .decoder import CachedDecoder
from .image_text import image_tokens, splice
from .model import TaskModel

IMAGE_EMBEDS = "image_embeds"
VISION = "vision"  # the vision graph's name (its engine, golden folder); the file is vision.onnx


class VisionGraph(TaskModel):
    """pixel_values, then the token selector's inputs -> the K projected image tokens the language model reads."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__(model, spec)
        extra = () if self.tokens is None else self.tokens.input_names
        self.input_names, self.output_names = ("pixel_values", *extra), (IMAGE_EMBEDS,)

    def example(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Positional inputs for ``pixel_values`` (and any selector input given); the selector's defaults fill
        the rest."""
        batch = inputs["pixel_values"].shape[0]
        return tuple(inputs[n] if n in inputs else self._default(n, batch) for n in self.input_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pixel_values, *extra = inputs
        if self.tokens is None:
            return (image_tokens(self.model, pixel_values),)
        return self.tokens.run(lambda: (image_tokens(self.model, pixel_values),),
                               dict(zip(self.tokens.input_names, extra)))


class ImageDecoder(CachedDecoder):
    """The decode graph: the VLM's language model and head, called directly (through the LLaVA wrapper,
    the exporter leaves the cache positions' length symbolic)."""

    def logits(self, tokens: dict[str, torch.Tensor], **kw) -> torch.Tensor:
        hf = pretrained(self.model)
        return hf.get_output_embeddings()(hf.get_submodule("model.language_model")(**tokens, **kw).last_hidden_state)


class ImagePrefill(ImageDecoder):
    """The prefill graph: input_ids, position_ids, cache_position, every past key and value, then image_embeds."""

    def __init__(self, model: nn.Module, spec: ModelSpec, adapter: Adapter, max_len: int):
        super().__init__(model, spec, adapter, max_len)
        self.input_names = (*self.input_names, IMAGE_EMBEDS)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, cache_position, *past, images = inputs
        embeds = splice(self.model, input_ids, images)
        return self.cached({"inputs_embeds": embeds}, position_ids, cache_position, past)

