"""LLaVA: both towers found, the task equals transformers' model, and token pruning feeds exactly K tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from core.errors import RecipeError
from methods.tokens.cls_attention import ClsAttention
from methods.tokens.pruner import Placement, TokenPruner
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks import TASKS, TaskModel
from tasks.image_text import feature_block, image_count, processor_image_count, prompt_ids

TASK = "image-text-to-text"
K = 6



@pytest.fixture
def model(llava_dir):
    return AutoModelForImageTextToText.from_pretrained(llava_dir).eval()


@pytest.fixture(scope="module")
def batch(llava_dir):
    """Two images with two questions, as calibration builds them (16 placeholders, right-padded to 48)."""
    processor = AutoProcessor.from_pretrained(llava_dir)
    torch.manual_seed(1)
    images = TASK_OBJ._with_prompts(processor, _image_batches(torch.randn(2, 3, 32, 32)), 48, "calibration")
    return images.batches[0].inputs


TASK_OBJ = TASKS[TASK]
SPEC = ModelSpec(source="x", task=TASK)


def _image_batches(pixels):
    from calibration.batches import Batch, Batches

    return Batches([Batch({"pixel_values": pixels})], "test")


def test_adapter_finds_both_towers(model):
    adapter = adapter_for("llava", TASK)
    towers = adapter.towers(model)
    assert list(towers) == ["model.vision_tower.encoder.layers", "model.language_model.layers"]
    vision, language = adapter.vision_blocks(model), adapter.blocks(model)
    assert [len(vision), len(language)] == [3, 2]
    assert (vision[0].num_heads, vision[0].head_dim, vision[0].intermediate_size) == (4, 8, 64)
    assert (language[0].num_heads, language[0].num_kv_heads, language[0].head_dim) == (4, 2, 16)
    assert vision[1].q == "model.vision_tower.encoder.layers.1.self_attn.q_proj"
    assert language[1].mlp_out == "model.language_model.layers.1.mlp.down_proj"
    assert adapter.vision_tokens(model).patches == 16 and feature_block(model.config) == 1
    assert adapter.projector(model) is model.model.multi_modal_projector
    with pytest.raises(RecipeError, match="task 'causal-lm' is not supported for 'llava'"):
        adapter_for("llava", "causal-lm")


def test_unpruned_forward_equals_transformers(model, batch):
    assert int((batch["input_ids"] == 320).sum(1)[0]) == 16 == image_count(model)
    with torch.no_grad():
        ref = model(**batch, use_cache=False).logits
        got = TaskModel(model, SPEC)(*TaskModel(model, SPEC).example(batch))[0]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert not got[~real].any()  # padding's logits are zero


def _prune(model, k=K):
    adapter = adapter_for("llava", TASK)
    return TokenPruner(model, adapter, ClsAttention(k), Placement(feature_block(model.config), False, True))


def test_pruned_model_reads_k_tokens_and_equals_manual_splice(model, batch):
    pruner = _prune(model)
    tm = TaskModel(model, SPEC)
    assert tm.output_names == ("logits",) and image_count(model) == K
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"].sum(1)), with_kwargs=True)
    inputs = tm.example(batch)
    with torch.no_grad():
        got = tm(*inputs)[0]
    hook.remove()
    ids = inputs[1]
    assert (ids == 320).sum(1).tolist() == [K, K]
    assert (seen[0] == batch["attention_mask"].sum(1) - (16 - K)).all()  # K image tokens + the question
    idx = pruner.last_index
    with torch.no_grad():  # the reference: LLaVA's features, K of them gathered, projected, spliced compactly
        feats = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        picked = torch.stack([feats[b, idx[b]] for b in range(2)])
        images = model.model.multi_modal_projector(picked)
        question = batch["input_ids"][:, 16:]
        compact = torch.cat([torch.full((2, K), 320), question], 1)
        embeds = model.get_input_embeddings()(compact)
        embeds[:, :K] = images
        ref = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, K, dtype=torch.long),
                                                                    batch["attention_mask"][:, 16:]], 1)).logits
    real = batch["attention_mask"][:, 16:].bool()
    torch.testing.assert_close(got[:, 16:][real], ref[:, K:][real], rtol=1e-4, atol=1e-4)
    pruner.remove()


def test_prompt_without_image_tokens_is_one_line(model, batch):
    text_only = {**batch, "input_ids": torch.where(batch["input_ids"] == 320, 5, batch["input_ids"])}
    with pytest.raises(RecipeError, match=r"holds \[0, 0\] image tokens \(id 320\) and the vision side gives 16"):
        TASK_OBJ.forward(model, text_only, SPEC)
    _prune(model, k=K)
    with pytest.raises(RecipeError, match="fewer image tokens than the 6"):
        TaskModel(model, SPEC).example(text_only)


def test_prompt_layout(llava_dir):
    processor = AutoProcessor.from_pretrained(llava_dir)
    assert processor_image_count(processor, torch.zeros(1, 3, 32, 32)) == 16
    ids = prompt_ids(processor.tokenizer, "What shape?", 320, 3)
    assert ids[:4] == [320, 320, 320, processor.tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_checkpoint_without_patch_size_or_with_another_image_token_is_one_line(llava_dir, tmp_path):
    import json
    import shutil

    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    TASK_OBJ.check_checkpoint(model, llava_dir)
    for key, value, message in (("patch_size", None, "has no processor with the vision patch_size"),
                                ("image_token", "<|endoftext|>", "the processor's image token is id 0 and the "
                                                                 "model's image_token_id is 320")):
        folder = tmp_path / key
        shutil.copytree(llava_dir, folder)
        config = json.loads((folder / "processor_config.json").read_text())
        (folder / "processor_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(RecipeError, match=message) as e:
            TASK_OBJ.check_checkpoint(model, folder)
        assert str(e.value).startswith("model.source: ") and "\n" not in str(e.value)
