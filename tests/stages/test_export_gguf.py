"""The export_gguf stage: files in the run folder, checked through transformers' GGUF loader."""

from __future__ import annotations

import json

import pytest

from core.errors import RecipeError
from export import gguf
from export.registry import pull, push
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run

from ..conftest import text_recipe, write_recipe

UNIFORM = {"type": "prune_structured", "method": "flap", "ratio": 0.5, "align": 8, "structure": "UL-UM",
           "plain_checkpoint": True}


def test_pruned_model_exported_to_gguf(bpe_llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, UNIFORM, {"type": "export_gguf", "formats": ["f16", "q8_0"]}]
    out = run(write_recipe(tmp_path, text_recipe(bpe_llama_dir, "causal-lm", stages)), output=tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["stages"][2]["metrics"]["files"]
    assert {a["path"] for a in manifest["artifacts"]} >= {"model-f16.gguf", "model-q8_0.gguf"}
    assert files["f16"]["bytes"] > files["q8_0"]["bytes"] == (out / "model-q8_0.gguf").stat().st_size
    assert files["f16"]["check"]["max_rel_err"] < 1e-3 and files["q8_0"]["check"]["max_rel_err"] < 2e-2
    assert files["f16"]["check"]["tokens"] == 2 * 2 * 16  # the export section's parity inputs: 2 batches of [2, 16]
    back = gguf.load_back(out / "model-f16.gguf")
    layer = manifest["stages"][1]["metrics"]["layers"][0]
    assert (back.config.num_attention_heads, back.config.num_key_value_heads, back.config.intermediate_size) == \
        (layer["heads"], layer["kv_heads"], layer["mlp_channels"])
    push(out, f"{tmp_path / 'registry'}/tiny:v1")  # the files travel with the artifact
    pull(f"{tmp_path / 'registry'}/tiny:v1", tmp_path / "pulled")  # every sha256 verified
    assert [(tmp_path / "pulled" / f"model-{k}.gguf").stat().st_size for k in ("f16", "q8_0")] == \
        [files["f16"]["bytes"], files["q8_0"]["bytes"]]


@pytest.mark.parametrize("change, words", [
    ({"ignore": ["re:.*layers\\.0$"]}, "targets/ignore leave some blocks unpruned"),
    ({"structure": "AL-AM"}, "structure AL-AM gives each layer its own sizes"),
])
def test_layers_of_different_shapes_are_refused_before_any_work(bpe_llama_dir, change, words):
    stages = [{"type": "calibrate"}, {**UNIFORM, "plain_checkpoint": False, **change}, {"type": "export_gguf"}]
    with pytest.raises(RecipeError, match="needs every layer the same shape") as e:
        plan(parse_recipe(text_recipe(bpe_llama_dir, "causal-lm", stages)))
    assert e.value.field == "stages[1]" and words in e.value.message


@pytest.mark.parametrize("stages, field, words", [
    ([{"type": "export_gguf", "formats": ["f16", "f16"]}], "stages[0].formats", "each format once"),
    ([{"type": "export_gguf", "formats": ["q5_k"]}], "stages[0].formats[0]", "'q5_k' is not allowed"),
    ([{"type": "export_gguf"}, {"type": "calibrate"}, UNIFORM], "stages[0]", "put export_gguf after every stage"),
])
def test_recipe_errors(bpe_llama_dir, stages, field, words):
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(bpe_llama_dir, "causal-lm", stages)))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_only_causal_lms(bert_dir):
    with pytest.raises(RecipeError, match="GGUF export is for causal LMs") as e:
        plan(parse_recipe(text_recipe(bert_dir, "feature-extraction", [{"type": "export_gguf"}])))
    assert e.value.field == "model.task"
