"""Phi-3: q/k/v fused in qkv_proj, gate/up in gate_up_proj."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from models.adapters import adapter_for

from ...conftest import small_decoder
from .common import HEAD_DIM, HIDDEN, assert_slice_equals_zeroing, check_run, logits, prune_and_export

ADAPTER = adapter_for("phi3", "causal-lm")


def build_phi3(folder: Path) -> Path:
    """Phi-3 (head_dim = 64 / 4 = 16): fused qkv_proj [64 | 32 | 32] and gate_up_proj [128 | 128]."""
    return small_decoder(tf.Phi3Config, tf.Phi3ForCausalLM, folder, original_max_position_embeddings=256)


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return build_phi3(tmp_path_factory.mktemp("phi3"))


def _phi3(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _unfused(phi3) -> LlamaForCausalLM:
    """The same network with separate q/k/v and gate/up Linears (Llama's layout)."""
    c = phi3.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=HEAD_DIM, rms_norm_eps=c.rms_norm_eps,
                      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True, pad_token_id=0)
    llama = LlamaForCausalLM(cfg).eval()
    state = {}
    for k, w in phi3.state_dict().items():
        if "qkv_proj" in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), w.split([64, 32, 32])):
                state[k.replace("qkv_proj", name)] = part
        elif "gate_up_proj" in k:
            for name, part in zip(("gate_proj", "up_proj"), w.chunk(2)):
                state[k.replace("gate_up_proj", name)] = part
        else:
            state[k] = w
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return llama


def test_phi3_block_layout(phi3_dir):
    model = _phi3(phi3_dir)
    towers = ADAPTER.towers(model)
    assert list(towers) == ["model.layers"] and towers["model.layers"] == ADAPTER.blocks(model)
    block = ADAPTER.blocks(model)[1]
    assert (block.q.rows, block.k.rows, block.v.rows) == ((0, 64), (64, 96), (96, 128))
    assert [p.rows for p in block.mlp_in] == [(0, 128), (128, 256)]
    assert block.linears == tuple(f"model.layers.1.{n}" for n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                   "mlp.gate_up_proj", "mlp.down_proj"))
    assert (block.num_heads, block.num_kv_heads, block.intermediate_size) == (4, 2, 128)
    assert ADAPTER.smoothing_groups(_phi3(phi3_dir))[0] == ("model.layers.0.input_layernorm",
                                                             ("model.layers.0.self_attn.qkv_proj",))


def test_phi3_fused_slice_equals_unfused_slice(phi3_dir):
    """Slicing the fused Linears computes exactly what slicing Llama's separate ones computes."""
    phi3 = _phi3(phi3_dir)
    llama = _unfused(phi3)
    ids = torch.randint(0, 30000, (2, 16))
    torch.testing.assert_close(logits(phi3, ids), logits(llama, ids), rtol=1e-5, atol=1e-5)  # same network
    torch.manual_seed(2)
    plan = [([2, 3], [1], sorted(torch.randperm(128)[:40].tolist())),  # a whole KV group
            ([0, 2], [0, 1], sorted(torch.randperm(128)[:72].tolist()))]  # one query head of each group
    for model in (phi3, llama):
        adapter = adapter_for(model.config.model_type, "causal-lm")
        for block, (heads, kv, ch) in zip(adapter.blocks(model), plan):
            adapter.slice_block(model, block, heads, kv, ch, o_bias=torch.full((HIDDEN,), 0.1),
                                mlp_bias=torch.full((HIDDEN,), -0.1))
    sliced = logits(phi3, ids)
    torch.testing.assert_close(sliced, logits(llama, ids), rtol=1e-5, atol=1e-5)
    blocks = ADAPTER.blocks(phi3)
    assert [(b.num_heads, b.num_kv_heads, b.intermediate_size) for b in blocks] == [(2, 1, 40), (2, 2, 72)]
    assert tuple(phi3.model.layers[0].self_attn.qkv_proj.weight.shape) == (4 * HEAD_DIM, HIDDEN)
    assert tuple(phi3.model.layers[1].mlp.gate_up_proj.weight.shape) == (144, HIDDEN)
    x = torch.randn(3, HIDDEN)  # each fused projection's rows are the unfused one's
    for b, lb in zip(blocks, adapter_for("llama", "causal-lm").blocks(llama)):
        for p, lp in zip((b.q, b.k, b.v, *b.mlp_in), (lb.q, lb.k, lb.v, *lb.mlp_in)):
            torch.testing.assert_close(p.apply(phi3, x), llama.get_submodule(lp)(x))
    assert phi3.config.num_attention_heads == 4  # the shared config is untouched; each layer has its own view
    assert phi3.model.layers[0].self_attn.config.num_attention_heads == 2
    torch.testing.assert_close(logits(copy.deepcopy(phi3), ids), sliced, rtol=0, atol=0)


def test_phi3_slice_equals_zeroing(phi3_dir):
    assert_slice_equals_zeroing(_phi3(phi3_dir), heads=[0, 1], kv_heads=[0], channels=list(range(0, 128, 2)))


def _shapes(h, kv, ch):
    return {"self_attn.qkv_proj": ((h + 2 * kv) * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, h * HEAD_DIM),
            "mlp.gate_up_proj": (2 * ch, HIDDEN), "mlp.down_proj": (HIDDEN, ch)}


def test_phi3_flap_wanda_2_4_export_reload(phi3_dir, tmp_path):
    out, manifest = prune_and_export(phi3_dir, tmp_path, {"structure": "AL-AM", "ratio": 0.4}, {"pattern": "2:4"})
    model, st = check_run(out, manifest, _shapes, nm=True)
    # within one unit (a KV group of 6 * 16 * 64 params) of 40% of the 73,728 prunable ones
    assert abs(st["achieved_ratio"] - 0.4) <= 6 * HEAD_DIM * HIDDEN / 73_728
    assert st["prunable_params_before"] == 73_728  # the fused Linears counted once
    assert {layer["heads"] for layer in st["layers"]} == {4, 2}  # blocks of different head counts, in one graph

    ids = torch.randint(0, 30000, (2, 16))  # a fresh process rebuilds the same model: no state leaks in
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = ("import numpy as np, torch; from tasks import load_checkpoint; "
            f"m, _ = load_checkpoint({str(out / 'checkpoint')!r}); "
            f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r})); "
            f"np.save({str(tmp_path / 'fresh.npy')!r}, m(input_ids=ids, use_cache=False).logits.detach().numpy())")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    np.testing.assert_array_equal(np.load(tmp_path / "fresh.npy"), logits(model, ids).numpy())
