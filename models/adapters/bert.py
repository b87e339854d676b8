"""BERT encoders (MiniLM): post-norm, so no pre-norm to smooth into."""

from .base import Adapter, register


@register
class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    tasks = ("feature-extraction",)
    block_list = r"(^|\.)encoder\.layer$"
    attn = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    mlp_in = ("intermediate.dense",)
    mlp_out = "output.dense"
