"""The decoder graphs: one weight file for both, static cache shapes, TensorRT-ready, and greedy
generation in ONNX Runtime token for token what transformers' ``generate`` gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from core.errors import StageFailed
from evaluation.generation import OrtDecoder, agreement, reference
from export import decoder, tensorrt
from export import onnx as onnx_export
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks.decoder import CachedDecoder

PREFILL, MAX_LEN = 16, 70  # not a multiple of the prefill length: a long prompt's last chunk steps back


@pytest.fixture(scope="module")
def exported(talkative_llama_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(talkative_llama_dir).eval()
    dec = CachedDecoder(model, ModelSpec(source="x", task="causal-lm"), adapter_for("llama", "causal-lm"), MAX_LEN)
    prefill = dec.example({"input_ids": torch.randint(0, 30000, (1, PREFILL))})
    path = tmp_path_factory.mktemp("decoder") / "model.onnx"
    decoder.export(dec, prefill, dec.step(prefill), path, 18)
    return model, dec, prefill, path


def test_two_graphs_one_weight_file(exported):
    model, _, _, path = exported
    folder = path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["decode.onnx", "model.onnx", "model.onnx.data"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head counted once
    data = (folder / "model.onnx.data").stat().st_size
    assert weights <= data < weights * 1.02
    for graph in ("model.onnx", "decode.onnx"):
        assert onnx_export.external_files(folder / graph) == [folder / "model.onnx.data"]
        assert (folder / graph).stat().st_size < data / 10
    a, b = (onnx.load(folder / g) for g in ("model.onnx", "decode.onnx"))  # with the shared weights read back
    assert sum(t.ByteSize() for t in a.graph.initializer) == pytest.approx(sum(t.ByteSize() for t in b.graph.initializer),
                                                                          rel=1e-3)


def test_static_shapes_ready_for_tensorrt(exported):
    _, dec, _, path = exported
    for graph, tokens in (("model.onnx", PREFILL), ("decode.onnx", 1)):
        model = onnx.load(path.with_name(graph))
        io = onnx_export.io_spec(model)
        assert [d["name"] for d in io["inputs"]] == list(dec.input_names)
        assert [d["name"] for d in io["outputs"]] == list(dec.output_names)
        assert [d["shape"] for d in io["inputs"][:4]] == [[1, tokens], [1, tokens], [tokens], [1, 2, MAX_LEN, 16]]
        assert io["outputs"][0]["shape"] == [1, tokens, 30522] and io["outputs"][1]["shape"] == [1, 2, MAX_LEN, 16]
        readiness = tensorrt.check(model, "jetson-orin-jp6")
        assert readiness.ok, readiness.summary()
        assert "ScatterND" in {n.op_type for n in model.graph.node}  # the cache is written, not concatenated


def test_greedy_generation_is_transformers_generate(exported):
    """32 new tokens from 8 prompts, shorter and longer than the prefill graph (those go in two chunks)."""
    model, _, _, path = exported
    ort = OrtDecoder(path, threads=1)
    assert (ort.prompt_len, ort.max_len) == (PREFILL, MAX_LEN)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 30000, (n,), generator=g).tolist() for n in (1, 3, 5, 8, 12, 16, 21, 38)]
    got = [ort.generate(p, 32).tokens for p in prompts]
    expected = [reference(model, p, 32) for p in prompts]
    assert got == expected
    assert len({t for seq in got for t in seq}) > 20  # varied tokens, not one repeated
    assert agreement(got, expected) == {"identical": 8, "prompts": 8, "prefix_agreement": 1.0}


def test_a_long_prompt_fills_the_cache_and_stops(exported):
    """66 tokens: the last chunk moves back to end at slot 70; then only 4 slots are left to decode into."""
    model, _, _, path = exported
    prompt = torch.randint(0, 30000, (66,), generator=torch.Generator().manual_seed(4)).tolist()
    out = OrtDecoder(path, threads=1).generate(prompt, 8)
    assert len(out.tokens) == 5 and out.tokens == reference(model, prompt, 5)
    assert out.first_token_s > 0 and out.tokens_per_s > 0


def test_sampling_is_seeded_and_tends_to_greedy(exported):
    _, _, _, path = exported
    ort = OrtDecoder(path, threads=1)
    prompt = [5, 17, 300]
    a, b = (ort.generate(prompt, 12, temperature=1.0, seed=1).tokens for _ in range(2))
    assert a == b and a != ort.generate(prompt, 12, temperature=1.0, seed=2).tokens
    assert ort.generate(prompt, 12, temperature=1e-6, seed=1).tokens == ort.generate(prompt, 12).tokens
    assert ort.generate(prompt, 12, eos=[ort.generate(prompt, 3).tokens[2]]).tokens == ort.generate(prompt, 3).tokens


def test_continuation_catches_a_decode_graph_that_drifts(exported, tmp_path):
    _, dec, prefill, path = exported
    names = dec.input_names
    ok = decoder.check_continuation(path, path.with_name("decode.onnx"), names, prefill, 1e-4, "stages[1]")
    assert ok["top1_same"] and ok["max_rel_err"] < 1e-5
    a, b = onnx.load(path), onnx.load(path.with_name("decode.onnx"))
    weight = max(b.graph.initializer, key=lambda t: t.dims[0] if len(t.dims) == 2 and t.dims[0] < 1000 else 0)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.5), weight.name))
    decoder.save_shared([a, b], [tmp_path / "model.onnx", tmp_path / "decode.onnx"])
    with pytest.raises(StageFailed, match="decode.onnx does not continue model.onnx") as e:
        decoder.check_continuation(tmp_path / "model.onnx", tmp_path / "decode.onnx", names, prefill, 0.05, "stages[1]")
    assert e.value.field == "stages[1]"
