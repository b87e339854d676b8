"""The easy-VQA VLM's plumbing on tiny random models (no training), and its committed weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from bench.vlm import assemble, clip, llava

MODELS = Path(__file__).resolve().parents[2] / "bench" / "models"
IMAGE_TOKENS = 4  # a 16x16 image in 8x8 patches


def tiny_lm():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval().requires_grad_(False)


def tiny_parts(rank: int = 2):
    """A tiny CLIP vision tower, Llama LM, and adapter whose LoRA is non-zero (so merging matters)."""
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=16, patch_size=8)).eval()
    lm = tiny_lm()
    config = llava.llava_config(vision.config, lm.config, IMAGE_TOKENS)
    adapter = llava.Adapter(config, lm, rank, alpha=2.0 * rank)
    for module in adapter.lora.values():
        torch.nn.init.normal_(module.B, std=0.5)
    return vision, lm, adapter, config


def test_tokenizer_round_trip():
    questions = ["what color is the shape?", "is there not a teal triangle in the image?"]
    tok = clip.build_tokenizer(questions)
    for q in questions:
        ids = tok(q)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == ["<bos>", *clip.words(q), "<eos>"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True).split() == clip.words(q)
    assert tok("a purple hexagon")["input_ids"][2:4] == [tok.unk_token_id] * 2


def test_splice_writes_features_exactly_at_placeholders():
    ids = torch.tensor([[5, 16, 16, 7, 16], [16, 9, 16, 16, 3]])
    embeds = torch.randn(2, 5, 6)
    image = torch.randn(2, 3, 6)
    out = llava.splice(embeds, ids, image)
    slots = ids == llava.IMAGE_TOKEN_ID
    assert torch.equal(out[slots], image.reshape(-1, 6))
    assert torch.equal(out[~slots], embeds[~slots])
    with pytest.raises(ValueError, match="6 image placeholders for 4 image tokens"):
        llava.splice(embeds, ids, torch.randn(2, 2, 6))


def test_packed_questions_compute_what_single_prompts_compute():
    _, lm, adapter, _ = tiny_parts()
    features = torch.randn(2, IMAGE_TOKENS, 16)
    blocks = [[([20, 21, 22], [30, 31, 2]), ([23, 24], [32, 2])], [([25], [33, 2])]]
    packed = llava.answer_logits(lm, adapter, features, llava.pack(blocks, IMAGE_TOKENS, 2))
    singles = torch.cat([llava.answer_logits(lm, adapter, features[i:i + 1], llava.pack([[qa]], IMAGE_TOKENS, 2))
                         for i, row in enumerate(blocks) for qa in row])
    assert packed.shape == (7, 64)
    torch.testing.assert_close(packed, singles, atol=1e-5, rtol=1e-5)


def test_assembled_llava_equals_the_manual_splice_forward():
    vision, lm, adapter, config = tiny_parts()
    pixels = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[llava.IMAGE_TOKEN_ID] * IMAGE_TOKENS + [20, 21, 22]])
    with torch.no_grad():
        features = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        embeds = llava.splice(lm.get_input_embeddings()(ids), ids, adapter.multi_modal_projector(features))
        manual = lm(inputs_embeds=embeds).logits  # LoRA still unmerged here
        model = assemble.combine(config, vision, adapter, lm)
        assembled = model(input_ids=ids, pixel_values=pixels).logits
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not any(isinstance(m, llava.LoRALinear) for m in model.modules())
    torch.testing.assert_close(assembled, manual, atol=1e-5, rtol=1e-4)


def test_adapter_save_load_round_trip(tmp_path):
    _, lm, adapter, config = tiny_parts()
    llava.save(adapter, config, tmp_path / "a", {"seed": 0})
    loaded = llava.load(tmp_path / "a", tiny_lm())
    assert set(loaded.trainable()) == set(adapter.trainable())
    for name, value in adapter.trainable().items():
        torch.testing.assert_close(loaded.trainable()[name], value.half().float())


@pytest.mark.skipif(not (MODELS / "easyvqa-clip" / "config.json").is_file(), reason="CLIP weights not committed")
def test_committed_clip_loads_with_64_patch_tokens():
    from transformers import CLIPModel, PreTrainedTokenizerFast

    model = CLIPModel.from_pretrained(MODELS / "easyvqa-clip")
    tok = PreTrainedTokenizerFast.from_pretrained(MODELS / "easyvqa-clip")
    assert model.vision_model.embeddings.patch_embedding.weight.shape == (clip.WIDTH, 3, clip.PATCH, clip.PATCH)
    assert model.vision_model.embeddings.position_embedding.weight.shape == (65, clip.WIDTH)
    assert model.text_model.embeddings.token_embedding.weight.shape == (len(tok), clip.WIDTH)
    assert tok.unk_token_id not in tok("is there not a teal triangle in the image?")["input_ids"]


@pytest.mark.skipif(not (MODELS / "easyvqa-llava" / llava.ADAPTER).is_file(), reason="adapter not committed")
def test_committed_adapter_has_projector_and_lora_shapes():
    from safetensors.torch import load_file
    from transformers import LlavaConfig

    tensors = load_file(str(MODELS / "easyvqa-llava" / llava.ADAPTER))
    config = LlavaConfig.from_pretrained(MODELS / "easyvqa-llava")
    rank = json.loads((MODELS / "easyvqa-llava" / "training.json").read_text())["lora_rank"]
    assert config.image_token_id == llava.IMAGE_TOKEN_ID and config.image_seq_length == 64
    assert tensors["multi_modal_projector.linear_1.weight"].shape == (576, clip.WIDTH)
    assert tensors["multi_modal_projector.linear_2.weight"].shape == (576, 576)
    assert tensors["lora.layers_0_q_proj.A"].shape == (rank, 576)
    assert tensors["lora.layers_29_v_proj.B"].shape == (192, rank)
    assert len([k for k in tensors if k.startswith("lora.")]) == 30 * 2 * 2


def test_token_bench_selects_k_of_the_committed_towers_patches():
    from bench.vlm import tokens

    towers = tokens.Towers(MODELS / "easyvqa-clip")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    questions = ["what color is the shape?", "is there a circle?", "what shape is in the image?"]
    full = towers.features(images, questions, None, towers.patches)
    assert full.shape == (3, 64, 128)
    assert torch.equal(towers.features(images, questions, "cls_attention", 64), full)  # keeping all 64 is unpruned
    for method in tokens.METHODS:
        got = towers.features(images, questions, method, 16, seed=1)
        assert got.shape == (3, 16, 128), method
        if method != "visionzip":  # the others keep patches as they are; VisionZip merges some
            assert (got[:, :, None] - full[:, None]).abs().amax(-1).amin(-1).max() == 0, method
    random = [towers.features(images, questions, "random", 16, seed=s) for s in (1, 1, 2)]
    assert torch.equal(random[0], random[1]) and not torch.equal(random[0], random[2])


def test_token_bench_table_marks_the_best_selector_per_k():
    from bench.vlm import tokens

    record = {"rows": [{"method": "unpruned", "keep": 1.0, "k": 64, "all": 0.654},
                       {"method": "cls_attention", "keep": 0.25, "k": 16, "all": 0.67},
                       {"method": "random", "keep": 0.25, "k": 16, "all": 0.64, "all_std": 0.01}]}
    latency = {"runs": {"k16": {"image_tokens": 16, "first_token_ms_vs_first_run": 0.406}}}
    assert tokens.markdown(record, latency).splitlines()[2:] == [
        "| 64 (100%) | 0.654 (unpruned) | | 1.00x |", "| 16 (25%) | **0.670** | 0.640 ± 0.010 | 0.41x |"]
