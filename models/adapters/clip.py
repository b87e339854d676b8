"""CLIP text and vision towers."""

from .base import Adapter, VisionTokens, register


@register
class ClipAdapter(Adapter):
    """CLIP: the task picks the tower (text for feature-extraction, vision for image tasks)."""

    family = "clip"
    model_types = ("clip", "clip_text_model", "clip_vision_model")
    tasks = ("feature-extraction", "image-feature-extraction")
    block_list = r"(^|\.)encoder\.layers$"
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    mlp_in = ("mlp.fc1",)
    mlp_out = "mlp.fc2"
    norms = ("layer_norm1", "layer_norm2")

    def head_dim(self, model):
        cfg = model.config
        return cfg.hidden_size // cfg.num_attention_heads

    def vision_tokens(self, model):
        return VisionTokens.square_grid(model.config, prefix=1) if hasattr(model.config, "patch_size") else None

    def joint_space(self, model):
        """CLIP's image side of the joint space: ``post_layernorm`` then ``visual_projection``."""
        tower = getattr(model, "vision_model", None)
        projection = getattr(model, "visual_projection", None)
        return (tower.post_layernorm, projection) if tower is not None and projection is not None else None
