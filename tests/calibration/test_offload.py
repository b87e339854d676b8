"""model.offload: a tiny Llama in sharded safetensors runs block by block from disk and gives exactly what the
in-memory run gives (statistics; Wanda, SparseGPT, AWQ, GPTQ and SmoothQuant weights; the saved checkpoint),
never holding more than one block; stages that need the whole model are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from calibration.layerwise import LayerwiseEngine
from calibration.spec import CalibrationSpec
from core.errors import RecipeError
from models import loading
from models.adapters import adapter_for
from models.offload import INDEX
from models.spec import ModelSpec
from pipeline.recipe import parse_recipe
from pipeline.runner import run
from tasks import TASKS

from ..conftest import VOCAB, _tokenizer_into, text_recipe, write_recipe

LAYERS = 3
WANDA_24 = {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}
GPTQ_16 = {"type": "gptq", "group_size": 16}
AWQ_16 = {"type": "awq", "group_size": 16, "grid": 4}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Three blocks, untied head, weights split over many shard files with an index."""
    folder = tmp_path_factory.mktemp("sharded-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="300KB")
    _tokenizer_into(folder)
    assert (folder / INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > LAYERS
    return folder


def _opened(folder, tmp_path):
    spec = ModelSpec(source=str(folder), task="causal-lm", offload=True)
    task = TASKS["causal-lm"]
    return loading.open_offloaded(spec, loading.resolve_source(spec), task, tmp_path / "staging", torch.float32,
                                  torch.device("cpu"))[0]


def test_statistics_equal_and_one_block_at_a_time(sharded, tmp_path):
    spec = ModelSpec(source=str(sharded), task="causal-lm")
    model, tok = loading.load_model(spec, loading.resolve_source(spec), TASKS["causal-lm"])
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=6, seq_len=16, batch_size=3))
    adapter = adapter_for("llama", "causal-lm")
    kinds = {"sq_norm", "mean_var", "hessian"}

    def targets(m):
        return {b.index: {n: m.get_submodule(n) for n in b.linears} for b in adapter.blocks(m)}

    dense = LayerwiseEngine(model, adapter, batches).run(targets(model), kinds, "dense")
    off = _opened(sharded, tmp_path)
    got = LayerwiseEngine(off.model, adapter, batches, offload=off).run(targets(off.model), kinds, "dense")
    assert got.keys() == dense.keys() and len(got) == 7 * LAYERS
    for name, fields in dense.items():
        for field, value in fields.items():
            assert torch.equal(got[name][field], value), (name, field)
    assert (off.loads, off.most_resident, off.resident) == (LAYERS, 1, set())
    assert all(p.is_meta for p in off.model.parameters())  # every block and the embeddings released
    assert not off.staged and not (tmp_path / "staging").exists()  # statistics change nothing


def _run(recipe: dict, tmp_path, name: str):
    return run(write_recipe(tmp_path, {**recipe, "name": name}, f"{name}.yaml"), tmp_path / name)


def _weights(folder) -> dict[str, torch.Tensor]:
    model, _ = loading.load_checkpoint(folder, TASKS["causal-lm"])
    return model.state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruned_weights_equal_in_memory(sharded, tmp_path, method):
    stages = [{"type": "calibrate"}, {**WANDA_24, "method": method}]
    mem = _run(text_recipe(sharded, "causal-lm", stages), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", stages, model={"offload": True}), tmp_path, "off")
    a, b = _weights(mem / "checkpoint"), _weights(off / "checkpoint")
    _assert_same(a, b)
    assert (a["model.layers.2.mlp.down_proj.weight"] == 0).float().mean() == 0.5
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (mem, off)]
    assert manifests[0]["stages"][1]["metrics"]["achieved_sparsity"] == 0.5
    assert [m["model"]["nonzero_params_after"] for m in manifests] == [manifests[0]["model"]["nonzero_params_after"]] * 2
    assert manifests[1]["stages"][1]["memory"]["peak_rss_mib"] > 0
    assert not (off / "offload").exists()  # the staging folder goes once the checkpoint holds every block
    index = json.loads((off / "checkpoint" / INDEX).read_text())["weight_map"]
    assert index["model.layers.1.self_attn.q_proj.weight"] == "model.layers.1.safetensors"


def test_awq_and_gptq_weights_equal_in_memory(sharded, tmp_path):
    chain = [{"type": "calibrate"}, WANDA_24, AWQ_16, GPTQ_16]
    mem = _run(text_recipe(sharded, "causal-lm", [*chain, {"type": "export"},
                                                  {"type": "quantize", "format": "int4", "group_size": 16}],
                           export={"tensorrt": {"target": "x86-trt10"}}), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", chain, model={"offload": True}), tmp_path, "off")
    _assert_same(_weights(mem / "checkpoint"), _weights(off / "checkpoint"))
    for i in (2, 3):  # AWQ's and GPTQ's own losses against round-to-nearest
        ratios = [json.loads((f / "manifest.json").read_text())["stages"][i]["metrics"]["mean_loss_ratio"]
                  for f in (mem, off)]
        assert ratios[0] == ratios[1] < 1
    assert AutoTokenizer.from_pretrained(off / "checkpoint").vocab_size == VOCAB


def test_smoothquant_equal_in_memory(sharded, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "smoothquant", "alpha": 0.5}]
    mem = _run(text_recipe(sharded, "causal-lm", stages), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", stages, model={"offload": True}), tmp_path, "off")
    a = _weights(mem / "checkpoint")
    _assert_same(a, _weights(off / "checkpoint"))
    assert not torch.equal(a["model.layers.0.input_layernorm.weight"], torch.ones(64))  # scales were folded


def test_resume_reads_the_last_stage_snapshot(sharded, tmp_path, monkeypatch):
    """A resumed offloaded run reads the reused stage's checkpoint, not the source: same result as one go."""
    from core.errors import StageFailed
    from stages.gptq import Gptq

    recipe = write_recipe(tmp_path, text_recipe(sharded, "causal-lm", [{"type": "calibrate"}, WANDA_24, GPTQ_16],
                                                model={"offload": True}))
    whole = run(recipe, output=tmp_path / "whole")
    real = Gptq.run

    def interrupted(self, ctx, folder):
        raise StageFailed("interrupted", field="stages[2]")

    monkeypatch.setattr(Gptq, "run", interrupted)
    with pytest.raises(StageFailed):
        run(recipe, output=tmp_path / "out")
    monkeypatch.setattr(Gptq, "run", real)
    out = run(recipe, output=tmp_path / "out", resume=True)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["resumed", "resumed", "ran"]
    _assert_same(_weights(whole / "checkpoint"), _weights(out / "checkpoint"))


@pytest.mark.parametrize("stages, field, words", [
    ([{"type": "calibrate"}, WANDA_24, {"type": "export_gguf"}], "stages[2]",
     "stage 'export_gguf' needs the whole model in memory and cannot run with model.offload (offloaded runs take: "),
    ([{"type": "calibrate"}, {"type": "prune_weights", "method": "gblm", "pattern": "2:4"}], "stages[1].method",
     "gblm backpropagates through the whole model, which model.offload keeps on disk"),
    ([{"type": "calibrate"}, {"type": "prune_structured", "method": "flap", "ratio": 0.25}], "stages[1]",
     "stage 'prune_structured' needs the whole model in memory"),
])
def test_refused_under_offload(sharded, stages, field, words):
    from pipeline.runner import plan

    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(sharded, "causal-lm", stages, model={"offload": True})))
    assert e.value.field == field and words in str(e.value)
