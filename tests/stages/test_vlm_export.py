"""A LLaVA recipe through the runner: token pruning feeding the language model, LM pruning, quantization."""

from __future__ import annotations

import json

import pytest

from core.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.runner import plan, run

from ..conftest import write_recipe

TASK = "image-text-to-text"
SEQ = 64  # the tiny BPE spells a question in about 35 tokens, after 16 image tokens




def vlm_recipe(model_dir, images, stages, **export) -> dict:
    data = {"source": "images", "path": str(images)}
    return {"name": "v", "model": {"source": str(model_dir), "task": TASK},
            "calibration": {**data, "num_samples": 8, "seq_len": SEQ, "batch_size": 4},
            "stages": stages, "export": {"seq_len": SEQ, "batch_size": 2, **export},
            "evaluation": {**data, "num_samples": 4, "lee": False, "latency": {"iterations": 3, "warmup": 1}}}


def prune_tokens(**kw) -> dict:
    return {"type": "token_prune", "method": "cls_attention", "keep": 6, "layer": 1, "output": True, **kw}


def test_token_prune_lm_wanda_int8_runs(llava_dir, vlm_images, tmp_path):
    stages = [{"type": "calibrate"},
              {"type": "prune_weights", "method": "wanda", "sparsity": 0.5, "targets": ["re:.*language_model\\."]},
              prune_tokens(), {"type": "export"}, {"type": "quantize", "format": "int8"}, {"type": "evaluate"}]
    recipe = vlm_recipe(llava_dir, vlm_images, stages)
    recipe["evaluation"]["accept"] = {"min_answer_match": 0.0, "min_token_agreement": 0.0}
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["ran"] * 6
    assert manifest["verdict"]["accepted"] is True
    by = {s["type"]: s["metrics"] for s in manifest["stages"]}
    # the language model's 2 blocks x 7 Linears: 73,728 weights, half of them zeroed
    assert (by["prune_weights"]["layers"], by["prune_weights"]["targeted_weights"]) == (14, 73_728)
    assert by["token_prune"]["keep"] == 6 and by["token_prune"]["tokens_out"] == 6
    onnx = json.loads((out / "stages" / "03-export" / "onnx.json").read_text())
    assert [i["name"] for i in onnx["inputs"]] == ["pixel_values", "input_ids", "attention_mask"]
    assert onnx["outputs"][0]["shape"] == [2, SEQ, 324] and onnx["tensorrt"]["ok"]
    cmp = by["evaluate"]["comparison"]
    assert 0 <= cmp["token_agreement"] <= 1 and 0 <= cmp["answer_match"] <= 1 and cmp["samples"] == 4


def test_token_prune_fp16_exports(llava_dir, vlm_images, tmp_path):
    stages = [prune_tokens(method="divprune"), {"type": "export"}, {"type": "quantize", "format": "fp16"}]
    out = run(write_recipe(tmp_path, vlm_recipe(llava_dir, vlm_images, stages)), output=tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["ran"] * 3
    assert manifest["stages"][0]["metrics"]["method"] == "divprune"


@pytest.mark.parametrize(("stage", "message"), [
    (prune_tokens(keep=17), "stages[1].keep: keep 17 is more than the 16 patch tokens"),
    (prune_tokens(layer=2), "stages[1].layer: layer 2 is not where the projector reads: vision_feature_layer -2 "
                            "is block 1; set layer: 1"),
    (prune_tokens(output=False), "stages[1].output: a vision-language model prunes the patches its projector reads"),
    (prune_tokens(method="trim", keep=None, prompt="a dog"), "stages[1].text_tower: trim scores patches in CLIP's "
                                                             "image-text space, and a vision-language model has "
                                                             "neither"),
    (prune_tokens(method="cdpruner", prompt="a dog"), "set text_tower to the folder of the full CLIPModel"),
])
def test_bad_vlm_token_prune_is_one_line(llava_dir, vlm_images, tmp_path, stage, message):
    recipe = vlm_recipe(llava_dir, vlm_images, [{"type": "calibrate"}, stage])
    with pytest.raises(RecipeError) as e:
        plan(load_recipe(write_recipe(tmp_path, recipe)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_text_tower_is_one_line(llava_dir, llava_clip_dir, clip_dir, vlm_images, tmp_path):
    import transformers as tf

    narrow = tmp_path / "narrow-clip"  # a full CLIPModel whose vision tower is 16 wide, not the VLM's 32
    tf.CLIPModel(tf.CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2),
                               vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2))).save_pretrained(narrow)
    untokenized = tmp_path / "no-tokenizer"  # the right CLIPModel without its tokenizer
    tf.CLIPModel.from_pretrained(llava_clip_dir).save_pretrained(untokenized)

    def refused(**kw) -> str:
        stage = prune_tokens(method="trim", prompt="a dog", **kw)
        with pytest.raises(RecipeError) as e:
            plan(load_recipe(write_recipe(tmp_path, vlm_recipe(llava_dir, vlm_images, [{"type": "calibrate"}, stage]))))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert refused(text_tower="missing-clip").startswith(
        f"stages[1].text_tower: {str(tmp_path / 'missing-clip')!r} is not a model folder (no config.json)")  # relative
    assert "is a 'llava' checkpoint, not a full CLIPModel" in refused(text_tower=str(llava_dir))
    assert "is 16 wide and the pruned one 32: name the CLIP checkpoint whose vision tower this model " \
           "uses" in refused(text_tower=str(narrow))
    assert "has no usable tokenizer" in refused(text_tower=str(untokenized))
    assert refused(text_tower=str(llava_clip_dir), text_len=129).startswith(
        "stages[1].text_len: text_len 129 is longer than the text tower's 128 positions")
    plan(load_recipe(write_recipe(tmp_path, vlm_recipe(llava_dir, vlm_images, [
        {"type": "calibrate"}, prune_tokens(method="trim", prompt="a dog", text_tower=str(llava_clip_dir))]))))


def test_a_text_tower_changed_in_place_is_not_resumed(llava_dir, llava_clip_dir, vlm_images, tmp_path):
    import shutil

    from core.errors import StageFailed

    tower = shutil.copytree(llava_clip_dir, tmp_path / "clip")
    stages = [{"type": "calibrate"}, prune_tokens(method="trim", prompt="a dog", keep=6, text_tower=str(tower)),
              {"type": "export"}]
    strict = write_recipe(tmp_path, vlm_recipe(llava_dir, vlm_images, stages, rtol=1e-12), "strict.yaml")
    ok = write_recipe(tmp_path, vlm_recipe(llava_dir, vlm_images, stages), "ok.yaml")
    out = tmp_path / "out"

    def resumed_statuses(change_tower: bool) -> list[str]:
        with pytest.raises(StageFailed, match="export.rtol"):  # leaves calibrate and token_prune to resume
            run(strict, output=out)
        if change_tower:  # same folder, other bytes
            (tower / "config.json").write_text((tower / "config.json").read_text() + "\n")
        done = run(ok, output=out, resume=True)
        statuses = [s["status"] for s in json.loads((done / "manifest.json").read_text())["stages"]]
        shutil.rmtree(done)
        return statuses

    assert resumed_statuses(change_tower=False) == ["resumed", "resumed", "ran"]
    assert resumed_statuses(change_tower=True) == ["resumed", "ran", "ran"]
