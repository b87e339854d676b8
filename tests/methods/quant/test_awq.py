"""AWQ: the fake quantizer is the export's, the folds keep the float function, and the searched
scales beat plain round-to-nearest when one input channel carries outliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from calibration.layerwise import block_outputs, capture_inputs
from calibration.spec import CalibrationSpec
from export.formats.int4 import int4_blocks
from methods.quant.awq import candidate_scales, fake_int4, fold, quantized_with, scale_groups, search_block
from models.adapters import adapter_for, linear
from tasks import TASKS

from ...conftest import VOCAB


def _decoder(cfg_cls, model_cls, kv_heads: int, **extra):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256, **extra)
    return model_cls(cfg).eval()


def _llama(kv_heads: int = 4):
    return _decoder(tf.LlamaConfig, tf.LlamaForCausalLM, kv_heads)


def _gemma3():
    model = _decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, 4, query_pre_attn_scalar=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])
    with torch.no_grad():  # stored norm weights start at 0 (scale 1 + 0): make them non-trivial
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model


def test_fake_int4_is_the_exports_int4_grid():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * 3  # 40 = 2 groups of 16 and a short last group of 8
    w[1, :16] = 0  # an all-zero group
    q, scale = int4_blocks(w.T.numpy(), 16)
    expect = (q.astype(np.float32) * np.repeat(scale, 16, 0)[:40]).T
    got = fake_int4(w, 16)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expect)
    assert (got[1, :16] == 0).all()


def test_candidate_scales():
    act = torch.tensor([4.0, 1.0, 0.0, 16.0])
    assert torch.equal(candidate_scales(act, 0.0), torch.ones(4, dtype=torch.float64))
    s = torch.tensor([2.0, 1.0, 1e-4, 4.0], dtype=torch.float64)  # sqrt, zero floored
    torch.testing.assert_close(candidate_scales(act, 0.5), s / (4.0 * 1e-4) ** 0.5)
    w, ones = torch.randn(3, 32), torch.ones(32, dtype=torch.float64)
    assert torch.equal(quantized_with(w, ones, 16), fake_int4(w, 16))  # s = 1: plain round-to-nearest


@pytest.mark.parametrize("kv_heads, names", [
    (4, ["attention input", "attention output", "MLP input", "MLP output"]),
    (2, ["attention input", "MLP input", "MLP output"])])
def test_llama_scale_groups(kv_heads, names):
    model = _llama(kv_heads)
    adapter = adapter_for("llama", "causal-lm")
    block = adapter.blocks(model)[0]
    groups, skipped = scale_groups(adapter, model, block)
    assert [g.name for g in groups] == names
    assert groups[0].norm == "model.layers.0.input_layernorm" and len(groups[0].linears) == 3
    assert groups[-1].rows == "model.layers.0.mlp.up_proj" and groups[-1].linears == ("model.layers.0.mlp.down_proj",)
    assert (kv_heads == 2) == any("grouped-query" in s for s in skipped)


def test_post_norm_bert_folds_only_v_into_o(bert_dir):
    model = tf.AutoModel.from_pretrained(bert_dir)
    adapter = adapter_for("bert", "feature-extraction")
    groups, skipped = scale_groups(adapter, model, adapter.blocks(model)[0])
    assert [(g.name, g.rows, g.linears) for g in groups] == [
        ("attention output", "encoder.layer.0.attention.self.value", ("encoder.layer.0.attention.output.dense",))]
    assert len(skipped) == 3 and "post-norm" in skipped[0]


def _fold_all(model, adapter, offset):
    torch.manual_seed(1)
    for block in adapter.blocks(model):
        for g in scale_groups(adapter, model, block)[0]:
            width = linear(model, g.linears[0]).in_features
            fold(model, g, torch.rand(width, dtype=torch.float64) * 10 + 0.05, offset)


@pytest.mark.parametrize("family, build", [("llama", _llama), ("gemma3", _gemma3)])
def test_folding_keeps_float_outputs(family, build):
    model, adapter = build(), adapter_for({"llama": "llama", "gemma3": "gemma3_text"}[family], "causal-lm")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :2] = 0  # pruned weights stay zero
        before = model(input_ids=ids).logits
    _fold_all(model, adapter, adapter.norm_offset)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4
    assert (model.model.layers[0].mlp.up_proj.weight[:, :2] == 0).all()


def test_gemma3_fold_needs_the_norm_offset():
    model, adapter = _gemma3(), adapter_for("gemma3_text", "causal-lm")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    _fold_all(model, adapter, 0.0)  # as if the norm scaled by its stored weight
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) > 1e-2


def _block_error(block, inputs, reference, group_size):
    """Block-output MSE with every Linear of the block on the int4 grid (the block is restored)."""
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    saved = [lin.weight.detach().clone() for lin in linears]
    with torch.no_grad():
        for lin in linears:
            lin.weight.copy_(fake_int4(lin.weight, group_size))
        out = block_outputs(block, inputs)
        for lin, w in zip(linears, saved):
            lin.weight.copy_(w)
    return float(sum(((o - r) ** 2).sum() for o, r in zip(out, reference)) / sum(r.numel() for r in reference))


def test_awq_beats_round_to_nearest_with_an_outlier_channel(llama_dir):
    model, adapter = _llama(2), adapter_for("llama", "causal-lm")
    with torch.no_grad():  # channel 5 of both norms' outputs 30x larger: an activation outlier
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight[5] *= 30
    batches = TASKS["causal-lm"].calibration_batches(tf.AutoTokenizer.from_pretrained(llama_dir),
                                                     CalibrationSpec(num_samples=8, seq_len=16, batch_size=4))
    inputs = capture_inputs(model, adapter, batches, torch.float32)
    block = adapter.blocks(model)[0]
    with torch.no_grad():
        reference = block_outputs(block.module, inputs)
    rtn = _block_error(block.module, inputs, reference, 32)
    groups, _ = scale_groups(adapter, model, block)
    modules = {n: linear(model, n) for g in groups for n in g.linears}
    found = search_block(block.module, inputs, groups, modules, group_size=32, grid=10)
    assert [len(r.losses) for r in found] == [10] * 3
    for r in found:
        assert r.losses[int(r.alpha * 10)] == min(r.losses) <= r.losses[0]
    assert found[0].alpha > 0  # the outlier makes scaling pay off
    with torch.no_grad():
        assert torch.equal(block_outputs(block.module, inputs)[0], reference[0])  # the search restored the block
    for r in found:
        fold(model, r.group, r.scales)
    awq = _block_error(block.module, inputs, reference, 32)
    assert awq < 0.7 * rtn, (awq, rtn)
