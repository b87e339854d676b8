"""Qwen3 decoders."""

from .base import register
from .llama import LlamaAdapter


@register
class Qwen3Adapter(LlamaAdapter):
    """Qwen3: Llama's layout plus ``q_norm``/``k_norm``, RMSNorms over one head's ``head_dim`` whose
    weight every head shares, so removing heads leaves them as they are."""

    family = "qwen3"
    model_types = ("qwen3",)
