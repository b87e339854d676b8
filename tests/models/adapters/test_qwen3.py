"""Qwen3: Llama's layout with per-head q_norm/k_norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers as tf
from transformers import AutoModelForCausalLM

from models.adapters import adapter_for

from ...conftest import small_decoder
from .common import HEAD_DIM, HIDDEN, assert_slice_equals_zeroing, check_run, prune_and_export


def build_qwen3(folder: Path) -> Path:
    return small_decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, folder, head_dim=16)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_qwen3(tmp_path_factory.mktemp("qwen3"))


def test_qwen3_slice_keeps_shared_head_norms(qwen3_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir).eval()
    assert adapter_for("qwen3", "causal-lm").family == "qwen3"
    assert_slice_equals_zeroing(model, heads=[0, 1], kv_heads=[0], channels=list(range(0, 128, 2)))
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_norm.weight.shape) == tuple(attn.k_norm.weight.shape) == (HEAD_DIM,)


def _shapes(h, kv, ch):
    return {"self_attn.q_proj": (h * HEAD_DIM, HIDDEN), "self_attn.k_proj": (kv * HEAD_DIM, HIDDEN),
            "self_attn.v_proj": (kv * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, h * HEAD_DIM),
            "mlp.gate_proj": (ch, HIDDEN), "mlp.up_proj": (ch, HIDDEN), "mlp.down_proj": (HIDDEN, ch)}


def test_qwen3_flap_wanda_export_reload(qwen3_dir, tmp_path):
    out, manifest = prune_and_export(qwen3_dir, tmp_path, {"structure": "AL-AM", "ratio": 0.3},
                                     {"sparsity": 0.5})
    _, st = check_run(out, manifest, _shapes, nm=False)
    # AL-AM: within one unit (a KV group of 6 * 16 * 64 params) of 30% of the 73,728 prunable ones
    assert abs(st["achieved_ratio"] - 0.3) <= 6 * HEAD_DIM * HIDDEN / 73_728
    assert sum(layer["mlp_channels"] for layer in st["layers"]) < 2 * 128
