"""model.offload + export: a tiny sharded Llama exported from its safetensors files one block at a time gives
the graph outputs the in-memory export gives (and PyTorch's), its weights in the external data file; what an
offloaded export cannot do is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import RecipeError
from export import offloaded
from export import onnx as onnx_export
from models import loading
from models.spec import ModelSpec
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from tasks import TASKS
from tasks.model import TaskModel

from ..conftest import VOCAB, _tokenizer_into, text_recipe, write_recipe

LAYERS = 3
STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}, {"type": "export"}]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def sharded(request, tmp_path_factory):
    """Three blocks in many shard files; the head untied, or tied to the embeddings (the files hold it once)
    and the weights in bfloat16."""
    folder = tmp_path_factory.mktemp("sharded-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=request.param)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from their all-ones start, so no two weights are equal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if request.param:  # saved in bfloat16: the export is float32 whatever the files hold, as in memory
        model.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="300KB")
    _tokenizer_into(folder)
    return folder


def _feeds(path):
    """Random token ids (and an all-ones mask) for every graph input, at the graph's static shapes."""
    rng = np.random.default_rng(0)
    feeds = {}
    for v in onnx.load(str(path), load_external_data=False).graph.input:
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = np.ones(shape, np.int64) if "mask" in v.name else rng.integers(0, VOCAB, shape)
    return feeds


def test_pipeline_export_equals_in_memory(sharded, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # the in-memory export writes external data too
    mem = run(write_recipe(tmp_path, {**text_recipe(sharded, "causal-lm", STAGES), "name": "mem"}, "mem.yaml"),
              tmp_path / "mem")
    off = run(write_recipe(tmp_path, {**text_recipe(sharded, "causal-lm", STAGES, model={"offload": True}),
                                      "name": "off"}, "off.yaml"), tmp_path / "off")
    feeds = _feeds(off / "model.onnx")
    got = [onnx_export.session(f / "model.onnx").run(None, feeds)[0] for f in (mem, off)]
    np.testing.assert_allclose(got[1], got[0], rtol=0, atol=1e-5)
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (mem, off)]
    exports = [m["stages"][2]["metrics"] for m in manifests]
    assert exports[1]["parity"]["max_rel_err"] < 1e-5 and exports[1]["parity"]["samples"] == exports[0]["parity"]["samples"]
    assert exports[1]["sparsity_check"] == exports[0]["sparsity_check"] == {"layers": 7 * LAYERS,
                                                                            "patterns": ["2:4"], "ok": True}
    assert exports[1]["tensorrt"]["sparse_2_4_layers"] == exports[0]["tensorrt"]["sparse_2_4_layers"] == 7 * LAYERS
    graph = onnx.load(str(off / "model.onnx"), load_external_data=False)
    weights = [i for i in graph.graph.initializer if np.prod(i.dims) >= 64 * 64]
    assert weights and all(i.data_location == onnx.TensorProto.EXTERNAL for i in weights)
    assert sum(len(i.raw_data) for i in graph.graph.initializer) < 10_000  # shapes and masks; no weight inline
    data = [(f / "model.onnx.data").stat().st_size for f in (mem, off)]
    assert data[0] <= data[1] < data[0] + 4096 * len(weights) + 2 * 4096  # the same weights, each on a page
    assert (off / "build" / "build_spec.json").is_file()
    assert manifests[1]["model"]["nonzero_params_after"] == manifests[0]["model"]["nonzero_params_after"]


def test_one_block_in_memory_and_pytorch_parity(sharded, tmp_path):
    spec = ModelSpec(source=str(sharded), task="causal-lm", offload=True)
    weights, _ = loading.open_offloaded(spec, loading.resolve_source(spec), TASKS["causal-lm"], tmp_path / "staging",
                                        torch.bfloat16, torch.device("cpu"))
    module = TaskModel(weights.model, spec).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    example = module.example({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    offloaded.export(module, weights, example, tmp_path / "model.onnx", 18)
    assert (weights.loads, weights.most_resident) == (0, 0)  # writing reads whole groups, never the skeleton's blocks
    reference = offloaded.Streamed(module, weights)
    par = onnx_export.parity(tmp_path / "model.onnx", reference, module.input_names, [example])
    assert par.max_rel_err < 1e-5
    assert (weights.loads, weights.most_resident, weights.dtype) == (LAYERS, 1, torch.bfloat16)  # fp32 while read
    assert all(p.is_meta for p in weights.model.parameters())
    dense, _ = loading.load_model(ModelSpec(source=str(sharded), task="causal-lm"), loading.resolve_source(spec),
                                  TASKS["causal-lm"])
    with torch.no_grad():
        assert torch.equal(reference(*example)[0], TaskModel(dense, spec).eval()(*example)[0])


@pytest.mark.parametrize("stages, export, field, words", [
    (STAGES, {"batch_size": 1, "decoder": {"max_len": 32}}, "export.decoder",
     "an offloaded model exports its one task graph, not prefill and decode graphs"),
    ([*STAGES, {"type": "quantize", "format": "fp16"}], {}, "stages[3]",
     "stage 'quantize' needs the whole model in memory and cannot run with model.offload"),
])
def test_refused_under_offload(sharded, stages, export, field, words):
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(sharded, "causal-lm", stages, model={"offload": True}, export=export)))
    assert e.value.field == field and words in str(e.value) and "\n" not in str(e.value)
