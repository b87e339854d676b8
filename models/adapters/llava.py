"""LLaVA: a CLIP vision tower, an MLP projector and a Llama-family language model in one model.

The two block stacks keep their own families' layouts (CLIP's and Llama's module names), so this
adapter delegates to them rather than repeating them: `towers` returns both stacks, `blocks` the
language model's (what calibration, weight and structured pruning, GPTQ/AWQ/SmoothQuant and
distillation walk: the language model is where a VLM spends its compute and parameters), and
`vision_blocks` the vision tower's (where token pruning selects, at LLaVA's feature layer). Head
sizes come from each tower's own sub-config, not from the composite config.
"""

from __future__ import annotations

from torch import nn

from .base import Block, VisionTokens, pretrained, register
from .clip import ClipAdapter
from .llama import LlamaAdapter


class _VisionTower(ClipAdapter):
    """CLIP's vision blocks inside a LLaVA model (not registered: reached through `LlavaAdapter`)."""

    block_list = r"(^|\.)vision_tower\.(vision_model\.)?encoder\.layers$"

    def head_dim(self, model):
        cfg = pretrained(model).config.vision_config
        return cfg.hidden_size // cfg.num_attention_heads


class _LanguageModel(LlamaAdapter):
    """The Llama-family language model's blocks inside a LLaVA model."""

    block_list = r"(^|\.)language_model\.(model\.)?layers$"

    def head_dim(self, model):
        cfg = pretrained(model).config.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


VISION, LANGUAGE = _VisionTower(), _LanguageModel()


@register
class LlavaAdapter(LlamaAdapter):
    """LLaVA (``LlavaForConditionalGeneration``): Llama's block layout for the language model, CLIP's for vision."""

    family = "llava"
    model_types = ("llava",)
    tasks = ("image-text-to-text",)
    block_list = LANGUAGE.block_list
    projects_image_tokens = True

    def head_dim(self, model):
        return LANGUAGE.head_dim(model)

    def towers(self, model: nn.Module) -> dict[str, list[Block]]:
        """Both stacks by ModuleList name: the vision tower's first, then the language model's."""
        return {**VISION.towers(model), **LANGUAGE.towers(model)}

    def blocks(self, model: nn.Module) -> list[Block]:
        return next(iter(LANGUAGE.towers(model).values()))

    def vision_blocks(self, model: nn.Module) -> list[Block]:
        return next(iter(VISION.towers(model).values()))

    def block_config(self, config):
        return config.text_config

    def vision_tokens(self, model):
        return VisionTokens.square_grid(pretrained(model).config.vision_config, prefix=1)

    def projector(self, model: nn.Module) -> nn.Module:
        """The MLP mapping vision features into the language model's embedding space."""
        return pretrained(model).get_submodule("model.multi_modal_projector")
