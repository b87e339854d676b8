"""A VLM's vision, prefill and decode graphs answer as transformers' model does, with and without token pruning."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from core.errors import RecipeError
from evaluation.generation import eos_ids
from evaluation.image_generation import OrtVlm
from export import vlm
from methods.tokens.cls_attention import ClsAttention
from methods.tokens.pruner import Placement, TokenPruner
from methods.tokens.random import RandomK, draw, per_image
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks.chat import chat_prompt_ids
from tasks.image_text import QUESTIONS

TASK, SEQ, MAX_LEN, NEW = "image-text-to-text", 64, 72, 5
SPEC = ModelSpec(source="x", task=TASK)
IMAGE = 320



def _export(model, processor, folder, k):
    torch.manual_seed(3)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.zeros(1, SEQ, dtype=torch.long)
    row = [IMAGE] * k + chat_prompt_ids(processor.tokenizer, QUESTIONS[0], raw=False)
    ids[0, :len(row)] = torch.tensor(row)
    return vlm.export(vlm.traced(model, SPEC, adapter_for("llava", TASK), MAX_LEN, pixels, ids), folder, 18)


def _ort(folder, model, processor, pixels, question, **kw):
    text = chat_prompt_ids(processor.tokenizer, question, raw=False)
    return OrtVlm(folder).generate(pixels.numpy(), text, IMAGE, NEW, eos=eos_ids(model.generation_config),
                                   **kw).tokens


def _pruned_reference(model, processor, pixels, idx, question) -> list[int]:
    """The pruned model in PyTorch: patches ``idx`` at the feature layer, projected, before the question, generated."""
    with torch.no_grad():
        feats = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        images = model.model.multi_modal_projector(feats[:, idx])
        text = torch.tensor([chat_prompt_ids(processor.tokenizer, question, raw=False)])
        embeds = torch.cat([images, model.get_input_embeddings()(text)], 1)
        return model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False)[0].tolist()


def test_unpruned_graphs_generate_as_transformers(llava_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    graphs = _export(model, processor, tmp_path, 16)
    assert [g.path.name for g in graphs] == ["model.onnx", "decode.onnx", "vision.onnx"]
    shapes = {g.name: {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.proto.graph.input}
              for g in graphs}
    assert shapes["vision"] == {"pixel_values": [1, 3, 32, 32]}
    assert shapes["model"]["image_embeds"] == [1, 16, 64] and shapes["model"]["input_ids"] == [1, SEQ]
    assert shapes["decode"]["input_ids"] == [1, 1] and "image_embeds" not in shapes["decode"]
    assert onnx.load(str(graphs[2].path)).graph.output[0].name == "image_embeds"
    for i, question in enumerate(QUESTIONS[:2]):
        torch.manual_seed(10 + i)
        pixels = torch.randn(1, 3, 32, 32)
        ids = torch.tensor([[IMAGE] * 16 + chat_prompt_ids(processor.tokenizer, question, raw=False)])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:].tolist()
        assert _ort(tmp_path, model, processor, pixels, question) == ref


def test_pruned_graphs_generate_as_the_pruned_model(llava_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    pruner = TokenPruner(model, adapter_for("llava", TASK), ClsAttention(6), Placement(1, False, True))
    graphs = _export(model, processor, tmp_path, 6)
    assert [d.dim_value for d in graphs[2].proto.graph.output[0].type.tensor_type.shape.dim] == [1, 6, 64]
    for i, question in enumerate(QUESTIONS):
        torch.manual_seed(20 + i)
        pixels = torch.randn(1, 3, 32, 32)
        got = _ort(tmp_path, model, processor, pixels, question)
        with torch.no_grad():
            graphs[2].module(pixels)
        assert got == _pruned_reference(model, processor, pixels, pruner.last_index[0], question)
    too_long = OrtVlm(tmp_path)
    with pytest.raises(RecipeError, match=r"--prompt: the prompt is 66 tokens \(6 image tokens and the question\); "
                                          r"the prefill graph reads 64"):
        too_long.prompt(np.zeros((1, 6, 64), np.float32), [1] * 60, IMAGE)


def test_random_k_vision_graph_takes_the_hosts_patches(llava_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    pruner = TokenPruner(model, adapter_for("llava", TASK), RandomK(6), Placement(1, False, True),
                         {"keep_idx": draw(16, 6, 0)[None]})
    graphs = _export(model, processor, tmp_path, 6)
    pruner.remove()  # the reference below gathers the host's patches itself
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graphs[2].proto.graph.input}
    assert inputs == {"pixel_values": [1, 3, 32, 32], "keep_idx": [1, 6]}
    vlm = OrtVlm(tmp_path)
    torch.manual_seed(30)
    pixels = torch.randn(1, 3, 32, 32)
    embeds = [vlm.vision.run(None, {"pixel_values": pixels.numpy(), "keep_idx": per_image(16, 6, 0, i)[None]})[0]
              for i in range(2)]
    assert not np.allclose(*embeds)  # another image id, other patches
    for i, question in enumerate(QUESTIONS[:2]):
        keep = per_image(16, 6, 0, i)
        assert len(set(keep.tolist())) == 6 and keep.max() < 16
        got = _ort(tmp_path, model, processor, pixels, question, keep_idx=keep)
        assert got == _pruned_reference(model, processor, pixels, torch.from_numpy(keep), question)
    with pytest.raises(RecipeError, match="RUN_OR_DIR: the run records no patch count"):  # no manifest.json here
        _ort(tmp_path, model, processor, pixels, QUESTIONS[0])
