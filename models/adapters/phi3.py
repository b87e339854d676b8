"""Phi-3 decoders: fused ``qkv_proj`` and ``gate_up_proj``."""

from .base import Adapter, own_config, register


@register
class Phi3Adapter(Adapter):
    """Phi-3: q, k and v are row ranges of one ``qkv_proj`` ([q | k | v]), gate and up the two halves
    of ``gate_up_proj`` (its forward ``chunk(2)``s them, so both keep the same channels).

    Phi3Attention splits qkv at ``self.config.num_attention_heads * head_dim``, a model-wide value,
    so a sliced attention gets its own `LayerConfig` with its head counts.
    """

    family = "phi3"
    model_types = ("phi3",)
    tasks = ("causal-lm",)
    block_list = r"(^|\.)layers$"
    attn = ("self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj")
    mlp_in = ("mlp.gate_up_proj", "mlp.gate_up_proj")
    mlp_out = "mlp.down_proj"
    norms = ("input_layernorm", "post_attention_layernorm")
    static_kv_cache = True

    def slice_block(self, model, block, heads, kv_heads, channels, o_bias=None, mlp_bias=None):
        super().slice_block(model, block, heads, kv_heads, channels, o_bias, mlp_bias)
        attention = model.get_submodule(block.q.rpartition(".")[0])
        own_config(attention, num_attention_heads=len(heads), num_key_value_heads=len(kv_heads))
