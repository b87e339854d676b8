"""Gemma 3 text: q_norm/k_norm per head, four norms per block, (1 + weight) RMSNorms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from methods.quant.smoothquant import fold, smoothing_scales
from models.adapters import adapter_for

from ...conftest import small_decoder
from .common import HEAD_DIM, HIDDEN, assert_slice_equals_zeroing, check_run, logits, prune_and_export


def build_gemma3(folder: Path) -> Path:
    """Gemma 3 text with one sliding-window layer (window 8, shorter than the test sequences)."""
    return small_decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, folder, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=8, layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return build_gemma3(tmp_path_factory.mktemp("gemma3"))


def _model(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_gemma3_slice_equals_zeroing(gemma3_dir):
    assert_slice_equals_zeroing(_model(gemma3_dir), heads=[2, 3], kv_heads=[1], channels=list(range(64, 128)))


@pytest.mark.parametrize("offset, changes", [(1.0, False), (0.0, True)])
def test_gemma3_smoothing_folds_into_one_plus_weight(gemma3_dir, offset, changes):
    """The MLP reads pre_feedforward_layernorm; folding must divide (1 + w), which the adapter says."""
    model = _model(gemma3_dir)
    adapter = adapter_for("gemma3_text", "causal-lm")
    assert adapter.norm_offset == 1.0
    groups = adapter.smoothing_groups(model)
    assert groups[:2] == [("model.layers.0.input_layernorm", tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")),
                          ("model.layers.0.pre_feedforward_layernorm", ("model.layers.0.mlp.gate_proj",
                                                                        "model.layers.0.mlp.up_proj"))]
    ids = torch.randint(0, 30000, (2, 12))
    before = logits(model, ids)
    torch.manual_seed(1)
    for norm, names in groups:
        linears = [model.get_submodule(n) for n in names]
        act = torch.rand(HIDDEN, dtype=torch.float64) * 50
        fold(model.get_submodule(norm), linears, smoothing_scales(act, [m.weight for m in linears], 0.5), offset)
    rel = float((logits(model, ids) - before).abs().max() / before.abs().max())
    assert (rel > 1e-2) if changes else (rel < 1e-4), rel


def _shapes(h, kv, ch):
    return {"self_attn.q_proj": (h * HEAD_DIM, HIDDEN), "self_attn.k_proj": (kv * HEAD_DIM, HIDDEN),
            "self_attn.v_proj": (kv * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, h * HEAD_DIM),
            "mlp.gate_proj": (ch, HIDDEN), "mlp.up_proj": (ch, HIDDEN), "mlp.down_proj": (HIDDEN, ch)}


def test_gemma3_flap_wanda_2_4_export_reload(gemma3_dir, tmp_path):
    out, manifest = prune_and_export(gemma3_dir, tmp_path, {"structure": "UL-UM", "ratio": 0.5}, {"pattern": "2:4"})
    model, st = check_run(out, manifest, _shapes, nm=True)
    # UL-UM 50%: one of two KV groups and 64 of 128 channels in every block
    assert [(layer["heads"], layer["kv_heads"], layer["mlp_channels"]) for layer in st["layers"]] == [(2, 1, 64)] * 2
    assert st["achieved_ratio"] == 0.5
    assert model.model.layers[0].self_attn.o_proj.bias is not None  # FLAP's bias compensation survived the reload
