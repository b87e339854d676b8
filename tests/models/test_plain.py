"""Plain checkpoints: a uniformly pruned model saves as an ordinary transformers checkpoint (models/plain.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.errors import RecipeError
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from tasks import load_checkpoint

from ..conftest import build_llama, text_recipe, write_recipe

UNIFORM = {"type": "prune_structured", "method": "flap", "ratio": 0.5, "align": 8, "structure": "UL-UM",
           "plain_checkpoint": True}


def _fresh_outputs(auto_class: str, folder, ids: torch.Tensor, tmp_path) -> np.ndarray:
    """What plain transformers computes from ``folder`` in a new process (nothing of ours imported)."""
    np.save(tmp_path / "ids.npy", ids.numpy())
    out = "logits" if auto_class == "AutoModelForCausalLM" else "last_hidden_state"
    code = (f"import numpy as np, torch; from transformers import {auto_class}; "
            f"m = {auto_class}.from_pretrained({str(folder)!r}).eval(); "
            f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r})); "
            f"np.save({str(tmp_path / 'fresh.npy')!r}, m(input_ids=ids).{out}.detach().numpy())")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return np.load(tmp_path / "fresh.npy")


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_uniform_prune_is_a_plain_transformers_checkpoint(kind, llama_dir, bert_dir, tmp_path):
    source, task, auto, prune = {
        "llama": (llama_dir, "causal-lm", "AutoModelForCausalLM", UNIFORM),
        # BERT derives its head size from hidden / heads, so only its MLP width can change in a plain config
        "bert": (bert_dir, "feature-extraction", "AutoModel", {**UNIFORM, "modules": "mlp"}),
    }[kind]
    out = run(write_recipe(tmp_path, text_recipe(source, task, [{"type": "calibrate"}, prune])), output=tmp_path / "out")
    layers = json.loads((out / "manifest.json").read_text())["stages"][1]["metrics"]
    assert layers["checkpoint"] == "plain transformers"
    shape = layers["layers"][0]
    assert all(layer == {**shape, "block": layer["block"]} for layer in layers["layers"])
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    meta = json.loads((out / "checkpoint" / "pipeline_checkpoint.json").read_text())
    assert "edgeprune_structure" not in config and meta["plain_transformers"] is True
    assert (config["num_attention_heads"], config["intermediate_size"]) == (shape["heads"], shape["mlp_channels"])
    if kind == "llama":  # one KV group of two went; FLAP's compensation biases need Llama's two bias flags
        assert (config["num_key_value_heads"], config["head_dim"], shape["heads"]) == (shape["kv_heads"], 16, 2)
        assert config["attention_bias"] and config["mlp_bias"]
        assert "model.layers.0.self_attn.q_proj.bias" in meta["zero_biases"]
    else:
        assert shape["mlp_channels"] == 32 and meta["zero_biases"] == []
    ids = torch.randint(0, 30000, (2, 16))
    fresh = _fresh_outputs(auto, out / "checkpoint", ids, tmp_path)
    model, _ = load_checkpoint(out / "checkpoint")
    if kind == "llama":  # our loader drops the zero biases again: the model is the one the run pruned
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is None and attn.o_proj.bias is not None and attn.o_proj.bias.any()
    with torch.no_grad():
        here = model(input_ids=ids)
    here = (here.logits if kind == "llama" else here.last_hidden_state).numpy()
    np.testing.assert_allclose(fresh, here, rtol=1e-5, atol=1e-5)


def test_per_layer_shapes_say_plain_transformers_cannot_load_them(llama_dir, tmp_path):
    prune = {**UNIFORM, "ignore": ["re:.*layers\\.0$"], "plain_checkpoint": False}  # block 0 keeps its sizes
    out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", [{"type": "calibrate"}, prune])),
              output=tmp_path / "out")
    metrics = json.loads((out / "manifest.json").read_text())["stages"][1]["metrics"]
    meta = json.loads((out / "checkpoint" / "pipeline_checkpoint.json").read_text())
    assert meta["plain_transformers"] is False and "layers differ in shape" in meta["not_plain_because"]
    assert metrics["checkpoint"] == f"tasks.load_checkpoint only: {meta['not_plain_because']}"
    assert "edgeprune_structure" in json.loads((out / "checkpoint" / "config.json").read_text())
    model, _ = load_checkpoint(out / "checkpoint")
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [128, 64]


@pytest.mark.parametrize("family, change, field, words", [
    ("llama", {"structure": "AL-AM"}, "structure", "use structure UL-UM or UL-MM"),
    ("llama", {"ignore": ["re:.*layers\\.0$"]}, "targets", "remove targets and ignore"),
    ("qwen2", {}, "bias_compensation", "a qwen2 config cannot give model.layers.0.self_attn.o_proj a bias"),
    ("bert", {}, "plain_checkpoint", "prune MLP channels only (modules: mlp)"),
])
def test_plain_checkpoint_refuses_what_a_config_cannot_state(family, change, field, words, bert_dir, tmp_path):
    source = bert_dir if family == "bert" else build_llama(tmp_path, family)
    task = "feature-extraction" if family == "bert" else "causal-lm"
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(source, task, [{"type": "calibrate"}, {**UNIFORM, **change}])))
    assert e.value.field == f"stages[1].{field}" and words in e.value.message, str(e.value)


def test_plain_checkpoint_accepts_what_a_config_can_state(tmp_path):
    qwen2 = build_llama(tmp_path, "qwen2")  # no bias flag, but head_dim is read from the config
    plan(parse_recipe(text_recipe(qwen2, "causal-lm", [{"type": "calibrate"}, {**UNIFORM, "bias_compensation": False}])))
