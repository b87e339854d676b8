"""Gemma 3 text decoders."""

from .base import Adapter, register


@register
class Gemma3Adapter(Adapter):
    """Gemma 3 (text): four norms per block, RMSNorms that scale by (1 + weight).

    ``q_norm``/``k_norm`` act per head over ``head_dim`` with one weight shared by all heads, so
    head removal leaves them alone. ``post_attention_layernorm`` normalises o_proj's output before
    the residual add (bias compensation still lands in o_proj's bias, before that norm); the MLP
    reads ``pre_feedforward_layernorm``, which is therefore the norm SmoothQuant folds gate/up into.
    """

    family = "gemma3"
    model_types = ("gemma3_text",)
    tasks = ("causal-lm",)
    block_list = r"(^|\.)layers$"
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    norms = ("input_layernorm", "pre_feedforward_layernorm")
    norm_offset = 1.0
    bias_flags = ("attention_bias", None)
