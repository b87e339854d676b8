"""TRIM's text side: CLIP's text tower as its own static-length graph.

``input_ids [B, L] -> text_embeds [B, P]`` (projected, not normalised, as TRIM uses it). The vision
graph takes ``text_embeds`` as an input, so one vision engine serves any prompt. No attention mask:
CLIP pools at the first end-of-text token under a causal mask, so right padding cannot change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TEXT_FILE = "text_encoder.onnx"
TEXT_TOKENIZER = "text_tokenizer"  # the folder next to it holding its tokenizer (shipped with the artifact)


class TextEncoder(nn.Module):
    input_names = ("input_ids",)
    output_names = ("text_embeds",)

    def __init__(self, model: nn.Module, tokenizer, length: int):
        super().__init__()
        self.model, self.tokenizer, self.length = model.eval(), tokenizer, length

    def ids(self, prompts: list[str]) -> torch.Tensor:
        """Token ids right-padded (or truncated) to the static length."""
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids).text_embeds,)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        return self(self.ids(prompts))[0]


@dataclass(frozen=True)
class Companion:
    """A graph exported next to model.onnx: ``module`` at the shapes of ``example``, and what its inputs
    are made with (``assets``: folder name and an object with ``save_pretrained``, e.g. the tokenizer)."""

    file: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    assets: tuple[tuple[str, Any], ...] = ()
