"""The supported families. Adding one is a subclass here plus a test in tests/test_adapters.py."""

from .base import Adapter, VisionTokens


def _patch_grid(config, prefix: int) -> VisionTokens:
    rows = config.image_size // config.patch_size
    return VisionTokens(prefix=prefix, rows=rows, cols=rows)


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    tasks = ("feature-extraction",)
    block_list = r"(^|\.)encoder\.layer$"
    attn = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    mlp_in = ("intermediate.dense",)
    mlp_out = "output.dense"


class LlamaAdapter(Adapter):
    """Llama-family decoders with grouped-query attention (Llama, Qwen2, Mistral; SmolLM2 is Llama)."""

    family = "llama"
    model_types = ("llama", "qwen2", "mistral")
    tasks = ("causal-lm",)
    block_list = r"(^|\.)layers$"
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = "mlp.down_proj"
    norms = ("input_layernorm", "post_attention_layernorm")


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
        return _patch_grid(model.config, prefix=1)  # [CLS] first


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
        return _patch_grid(model.config, prefix=1) if hasattr(model.config, "patch_size") else None

    def joint_space(self, model):
        """CLIP's image side of the joint space: ``post_layernorm`` then ``visual_projection``."""
        tower = getattr(model, "vision_model", None)
        projection = getattr(model, "visual_projection", None)
        return (tower.post_layernorm, projection) if tower is not None and projection is not None else None
