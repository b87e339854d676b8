"""GGUF for llama.cpp (export/gguf.py): names, Q/K row order, types and tokenizer, checked by loading the
files back through transformers' GGUF loader."""

from __future__ import annotations

import gguf as gguf_pkg
import pytest
import torch

from core.errors import RecipeError
from export import gguf
from models.adapters import adapter_for

from ..conftest import CHAT_TEMPLATE, build_bpe_tokenizer


@pytest.fixture(scope="module")
def pruned(bpe_llama_dir):
    """The tiny BPE Llama pruned alike in both blocks (one KV group, half the MLP), with compensation
    biases on o_proj and down_proj as FLAP leaves them. q and k are scaled up so attention is sharp:
    at initialisation it is nearly uniform, and a wrong Q/K row order would hardly show in the logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bpe_llama_dir, dtype=torch.float32).eval()
    adapter = adapter_for("llama", "causal-lm")
    torch.manual_seed(1)
    for b in adapter.blocks(model):
        for proj in (b.q, b.k):
            model.get_submodule(proj).weight.data *= 10
        adapter.slice_block(model, b, [2, 3], [1], list(range(0, 128, 2)), 0.1 * torch.randn(64), 0.1 * torch.randn(64))
    return model, AutoTokenizer.from_pretrained(bpe_llama_dir), adapter


def _ids(n: int = 2) -> list[torch.Tensor]:
    return [torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(n)]


# Measured on this model (largest logit error over the largest logit): f16 2e-4, q8_0 5e-3, q4_0 2e-2,
# q4_1 2e-2; the same file written without the Q/K interleave is off by 7e-2.
@pytest.mark.parametrize("kind, rel, types", [
    ("f16", 1e-3, {"F16": 15, "F32": 9}),
    ("q8_0", 1e-2, {"F32": 9, "Q8_0": 15}),
    ("q4_0", 4e-2, {"F32": 9, "Q4_0": 14, "Q8_0": 1}),
    ("q4_1", 4e-2, {"F32": 9, "Q4_1": 14, "Q8_0": 1}),
])
def test_file_loads_back_with_the_models_logits(pruned, tmp_path, kind, rel, types):
    model, tok, adapter = pruned
    written = gguf.write(model, tok, adapter, tmp_path / f"m-{kind}.gguf", kind, "tiny")
    assert written.tensor_types == types  # 9 vectors: per block 2 norms and 2 biases, then the final norm
    back = gguf.load_back(written.path)
    assert (back.config.num_attention_heads, back.config.num_key_value_heads, back.config.head_dim,
            back.config.intermediate_size) == (2, 1, 16, 64)
    check = gguf.compare(model, back, _ids())
    assert check["max_rel_err"] < rel and check["top1_agreement"] >= 0.9, check


def test_file_sizes_follow_the_types(pruned, tmp_path):
    model, tok, adapter = pruned
    sizes = [gguf.write(model, tok, adapter, tmp_path / f"{k}.gguf", k, "t").bytes for k in ("f16", "q8_0", "q4_1", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)


def test_q_and_k_rows_interleave_each_heads_halves():
    rows = torch.arange(8.0).unsqueeze(1)  # two heads of head_dim 4
    assert gguf.interleave_halves(rows, 4).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_written_without_the_interleave_the_file_is_wrong(pruned, tmp_path, monkeypatch):
    model, tok, adapter = pruned
    monkeypatch.setattr(gguf, "interleave_halves", lambda rows, head_dim: rows)
    back = gguf.load_back(gguf.write(model, tok, adapter, tmp_path / "m.gguf", "f16", "t").path)
    assert gguf.compare(model, back, _ids())["max_rel_err"] > 4e-2  # the check sees a wrong row order


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_tokenizer_round_trips_through_transformers(pre, tmp_path):
    from transformers import AutoTokenizer

    tok = build_bpe_tokenizer(pre)
    path = tmp_path / "tok.gguf"
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    gguf.add_tokenizer(writer, tok, len(tok) + 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf_pkg.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == pre
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf_pkg.TokenType.CONTROL] * 3 and types[3] == gguf_pkg.TokenType.NORMAL
    assert types[-4:] == [gguf_pkg.TokenType.UNUSED] * 4
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    text = "<|im_start|>The quick fox, 1999 and 42 shells!\n  Hello<|im_end|>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert (back.bos_token, back.eos_token, back.unk_token, back.chat_template) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>", CHAT_TEMPLATE)


def test_refusals(pruned, bert_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model, tok, adapter = pruned
    with pytest.raises(RecipeError, match="byte-level BPE"):
        gguf.add_tokenizer(gguf_pkg.GGUFWriter(str(tmp_path / "x.gguf"), "llama"), AutoTokenizer.from_pretrained(bert_dir), 8)
    with pytest.raises(RecipeError, match="no llama.cpp name known"):
        gguf.pre_tokenizer_name({"type": "Whitespace"})
    with pytest.raises(RecipeError, match="supports llama models, not 'bert'"):
        gguf.check_model(AutoModel.from_pretrained(bert_dir), adapter_for("bert", "feature-extraction"), "f")
    b = adapter.blocks(model)[0]
    adapter.slice_block(model, b, [0, 1], [0], list(range(32)))  # block 0 now differs from block 1
    with pytest.raises(RecipeError, match="every layer the same shape"):
        gguf.check_model(model, adapter, "f")
