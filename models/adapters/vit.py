"""ViT image encoders."""

from .base import Adapter, VisionTokens, register


@register
class ViTAdapter(Adapter):
    family = "vit"
    model_types = ("vit",)
    tasks = ("image-classification", "image-feature-extraction")
    block_list = r"(^|\.)layers$"
    attn = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
    mlp_in = ("mlp.fc1",)
    mlp_out = "mlp.fc2"
    norms = ("layernorm_before", "layernorm_after")

    def vision_tokens(self, model):
        return VisionTokens.square_grid(model.config, prefix=1)  # [CLS] first
