"""A VLM run with export.decoder: three graphs through the gate, and `pipeline generate --image` answering
with the tokens the pruned PyTorch model generates."""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import onnx as onnx_lib
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPModel

from core.errors import RecipeError
from evaluation.image_generation import OrtVlm
from export.artifact import deployable
from methods.tokens.cls_attention import ClsAttention
from methods.tokens.pruner import Placement, TokenPruner
from methods.tokens.random import RandomK, per_image
from methods.tokens.text import TextEncoder
from methods.tokens.trim import Trim
from models.adapters import adapter_for
from models.loading import load_model, resolve_source
from models.spec import ModelSpec
from pipeline.generate import generate
from pipeline.recipe import load_recipe
from pipeline.runner import plan, run
from tasks import TASKS
from tasks.chat import chat_prompt_ids

from ..conftest import write_recipe

QUESTION, NEW = "What color is the shape?", 6




# The tiny BPE spells QUESTIONS[0] in about 35 tokens: the unpruned prompt (16 placeholders) needs the calibration's
# 64, the pruned one (6) fits a 48-token prefill window.
WINDOW = 48


def recipe(model_dir, images, stages, window: int = WINDOW) -> dict:
    return {"name": "g", "model": {"source": str(model_dir), "task": "image-text-to-text"},
            "calibration": {"source": "images", "path": str(images), "num_samples": 4, "seq_len": 64, "batch_size": 2},
            "stages": stages, "export": {"seq_len": window, "batch_size": 1, "decoder": {"max_len": window + 16}}}


PRUNE = {"type": "token_prune", "method": "cls_attention", "keep": 6, "layer": 1, "output": True}


@pytest.fixture(scope="module")
def vlm_run(llava_dir, vlm_images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    return run(write_recipe(tmp, recipe(llava_dir, vlm_images, [PRUNE, {"type": "export"}])), output=tmp / "out")


def _reference(llava_dir, image, method=None, question: str = QUESTION, **inputs) -> list[int]:
    """Greedy tokens of the pruned PyTorch model: K = 6 patches at the feature layer (``method``, cls_attention by
    default, reading the graph ``inputs``), projected, before the question."""
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    pruner = TokenPruner(model, adapter_for("llava", "image-text-to-text"), method or ClsAttention(6),
                         Placement(1, False, True))
    pixels = torch.from_numpy(processor.image_processor(images=[Image.open(image).convert("RGB")],
                                                        return_tensors="np")["pixel_values"])
    with torch.no_grad():
        tower = model.model.vision_tower
        feats = pruner.run(lambda: tower(pixels, output_hidden_states=True), inputs).hidden_states[-2][:, 1:]
        images = model.model.multi_modal_projector(feats[:, pruner.last_index[0]])
        text = torch.tensor([chat_prompt_ids(processor.tokenizer, question, raw=False)])
        embeds = torch.cat([images, model.get_input_embeddings()(text)], 1)
        return model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False)[0].tolist()


def test_vlm_run_ships_three_checked_graphs(vlm_run):
    assert all((vlm_run / f).is_file() for f in ("vision.onnx", "model.onnx", "decode.onnx", "model.onnx.data"))
    onnx = json.loads((vlm_run / "stages" / "01-export" / "onnx.json").read_text())
    assert [i["name"] for i in onnx["vision"]["inputs"]] == ["pixel_values"]
    assert onnx["vision"]["outputs"][0]["shape"] == [1, 6, 64]  # K = 6 projected image tokens
    assert onnx["inputs"][-1] == {"name": "image_embeds", "dtype": "float32", "shape": [1, 6, 64]}
    assert onnx["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": [1, WINDOW]}
    for g in (onnx, onnx["decode"], onnx["vision"]):
        assert g["parity"]["max_rel_err"] <= 1e-4
    assert onnx["tensorrt"]["ok"] and onnx["token_pruning"]["topk_k"] == [6]
    build = json.loads((vlm_run / "build" / "build_spec.json").read_text())
    assert [g["name"] for g in build["graphs"]] == ["model", "decode", "vision"]
    manifest = json.loads((vlm_run / "manifest.json").read_text())
    assert {"vision.onnx", "model.onnx", "decode.onnx"} <= {a["path"] for a in manifest["artifacts"]}


def test_generate_with_image_equals_pruned_pytorch(vlm_run, llava_dir, vlm_images):
    image = vlm_images / "checks" / "0.png"
    out, err = io.StringIO(), io.StringIO()
    result = generate(vlm_run, QUESTION, max_new_tokens=NEW, image=image, out=out, err=err)
    assert result.prompt[:7].count(320) == 6 and result.prompt[6] != 320  # K placeholders, then the question
    assert result.tokens == _reference(llava_dir, image)
    assert "prompt tokens; first token after" in err.getvalue()


def test_vlm_generate_and_recipe_errors_are_one_line(vlm_run, llava_dir, vlm_images, tmp_path):
    with pytest.raises(RecipeError, match=r"--image: '.*' is a VLM run: give --image"):
        generate(vlm_run, QUESTION, max_new_tokens=2, out=io.StringIO(), err=io.StringIO())
    (tmp_path / "not-an-image.png").write_text("text")
    with pytest.raises(RecipeError, match="--image: cannot read image"):
        generate(vlm_run, QUESTION, max_new_tokens=2, image=tmp_path / "not-an-image.png", out=io.StringIO(),
                 err=io.StringIO())
    evaluated = recipe(llava_dir, vlm_images, [PRUNE, {"type": "export"}, {"type": "evaluate"}])
    evaluated["evaluation"] = {"source": "images", "path": str(vlm_images), "num_samples": 2}
    with pytest.raises(RecipeError, match="export.decoder: an image-text-to-text run with export.decoder has no "
                                          "'evaluate' stage yet"):
        plan(load_recipe(write_recipe(tmp_path, evaluated)))


def test_int4_rewrites_the_language_model_graphs_and_still_answers(llava_dir, vlm_images, tmp_path):
    stages = [PRUNE, {"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 32}]
    data = recipe(llava_dir, vlm_images, stages)
    data["export"]["tensorrt"] = {"target": "x86-trt10"}  # int4's blocked DequantizeLinear needs opset 21
    out = run(write_recipe(tmp_path, data), output=tmp_path / "out")
    onnx = json.loads((out / "stages" / "02-quantize" / "onnx.json").read_text())
    details = onnx["quantization"]
    assert details["layers"] == 14 and details["continuation"]["top1_same"]  # 2 LM blocks x 7 Linears
    for name in ("model", "decode"):  # both LM graphs hold int4 weights; the vision graph ships as exported
        graph = onnx_lib.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert sum(n.op_type == "DequantizeLinear" for n in graph.graph.node) >= 14
    exported = json.loads((out / "stages" / "01-export" / "onnx.json").read_text())
    assert onnx["vision"]["bytes"] == exported["vision"]["bytes"] and onnx["bytes"] < exported["bytes"]
    assert 0 < details["parity"]["max_rel_err"] <= 0.5  # int4's tolerance on the prefill logits
    build = json.loads((out / "build" / "build_spec.json").read_text())
    assert [g["name"] for g in build["graphs"]] == ["model", "decode", "vision"]
    image = vlm_images / "checks" / "0.png"
    result = generate(out, QUESTION, max_new_tokens=NEW, image=image, out=io.StringIO(), err=io.StringIO())
    assert result.tokens[0] == _reference(llava_dir, image)[0]  # the float model's first answer token


def test_prefill_window_too_short_for_the_pruned_prompt_is_one_line(llava_dir, vlm_images, tmp_path):
    with pytest.raises(RecipeError) as e:
        run(write_recipe(tmp_path, recipe(llava_dir, vlm_images, [PRUNE, {"type": "export"}], window=24)),
            output=tmp_path / "out")
    assert str(e.value).startswith("export.seq_len: the prefill window must hold the 6 image tokens and the question")
    assert "\n" not in str(e.value)


def test_trim_with_a_clip_text_tower_picks_image_tokens_for_the_question(llava_dir, llava_clip_dir, vlm_images,
                                                                          tmp_path):
    trim = {**PRUNE, "method": "trim", "fuse": False, "prompt": "a shape", "text_len": 16,
            "text_tower": str(llava_clip_dir)}
    out = run(write_recipe(tmp_path, recipe(llava_dir, vlm_images, [{"type": "calibrate"}, trim, {"type": "export"}])),
              output=tmp_path / "out")
    onnx = json.loads((out / "stages" / "02-export" / "onnx.json").read_text())
    assert [i["name"] for i in onnx["vision"]["inputs"]] == ["pixel_values", "text_embeds"]
    companion = onnx["token_pruning"]["companions"][0]
    assert companion["path"] == "text_encoder.onnx" and companion["assets"] == ["text_tokenizer"]
    assert companion["inputs"][0]["shape"] == [1, 16] and companion["parity"]["max_rel_err"] <= 1e-4
    shipped = {a["path"] for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert {"text_encoder.onnx", "text_tokenizer/tokenizer_config.json"} <= shipped
    assert deployable("text_encoder.onnx") and deployable("text_tokenizer/tokenizer_config.json")
    # the text side is the named CLIP checkpoint's: its text tower for the question, its projection for the patches
    clip = CLIPModel.from_pretrained(llava_clip_dir).eval()
    spec = ModelSpec(source=str(llava_clip_dir), task="feature-extraction")
    text = TextEncoder(*load_model(spec, resolve_source(spec), TASKS[spec.task]), 16)
    asked, recipe_prompt = text.embed([QUESTION]), text.embed(["a shape"])
    fed = OrtVlm(out).selector_inputs(QUESTION, None, 0, 0)["text_embeds"]
    np.testing.assert_allclose(fed, asked.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(fed, recipe_prompt.numpy(), atol=1e-3)
    image = vlm_images / "checks" / "0.png"
    result = generate(out, QUESTION, max_new_tokens=NEW, image=image, out=io.StringIO(), err=io.StringIO())
    method = Trim(6, 1.0, (clip.vision_model.post_layernorm, clip.visual_projection))
    assert result.tokens == _reference(llava_dir, image, method, text_embeds=asked)


def test_random_k_draws_each_images_patches_from_the_seed(llava_dir, vlm_images, tmp_path):
    random_k = {**PRUNE, "method": "random"}
    out = run(write_recipe(tmp_path, recipe(llava_dir, vlm_images, [random_k, {"type": "export"}])),
              output=tmp_path / "out")
    onnx = json.loads((out / "stages" / "01-export" / "onnx.json").read_text())
    assert onnx["vision"]["inputs"][1] == {"name": "keep_idx", "dtype": "int64", "shape": [1, 6]}
    image = vlm_images / "checks" / "0.png"
    keep = per_image(16, 6, 3, zlib.crc32(image.read_bytes()))
    assert not np.array_equal(keep, per_image(16, 6, 4, zlib.crc32(image.read_bytes())))
    result = generate(out, QUESTION, max_new_tokens=NEW, image=image, seed=3, out=io.StringIO(), err=io.StringIO())
    method = RandomK(6)
    assert result.tokens == _reference(llava_dir, image, method, keep_idx=torch.from_numpy(keep)[None])
