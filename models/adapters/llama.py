"""Llama-family decoders."""

from typing import ClassVar

from .base import Adapter, register


@register
class LlamaAdapter(Adapter):
    """Llama-family decoders with grouped-query attention (Llama, Qwen2, Mistral; SmolLM2 is Llama)."""

    family = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "qwen2", "mistral")  # typed: subclasses list fewer
    tasks = ("causal-lm",)
    block_list = r"(^|\.)layers$"
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    norms = ("input_layernorm", "post_attention_layernorm")
    # Llama's own; Qwen2 and Mistral configs have neither, Qwen3's only the first (models/plain.py checks)
    bias_flags: ClassVar[tuple[str | None, str | None]] = ("attention_bias", "mlp_bias")
    static_kv_cache = True
