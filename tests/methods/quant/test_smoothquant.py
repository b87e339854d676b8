"""SmoothQuant: the scales by hand, and the transform leaves the float model's outputs unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from methods.quant.smoothquant import CLAMP, fold, outlier_ratio, smoothing_scales
from models.adapters import adapter_for


def test_scales_match_hand_computation():
    act = torch.tensor([4.0, 1.0, 9.0, 0.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-0.25, 1.0, 3.0, 0.0]])  # [out, in]
    w2 = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    w_max = [2.0, 2.0, 3.0, CLAMP]  # per input column, over the rows of both weights; all-zero column clamped
    expect = [max(math.sqrt(a) / math.sqrt(m), CLAMP) for a, m in zip([4.0, 1.0, 9.0, 0.0], w_max)]
    torch.testing.assert_close(s, torch.tensor(expect, dtype=torch.float64))
    s75 = smoothing_scales(act, [w1, w2], alpha=0.75)
    assert float(s75[2]) == pytest.approx(9.0 ** 0.75 / 3.0 ** 0.25)


def test_outlier_ratio():
    assert outlier_ratio(torch.tensor([1.0, 1.0, 4.0])) == pytest.approx(2.0)
    assert outlier_ratio(torch.ones(5)) == 1.0 and outlier_ratio(torch.zeros(3)) == 0.0


def _equivalence(model, adapter, inputs, call):
    torch.manual_seed(1)
    model.eval()
    groups = adapter.smoothing_groups(model)
    with torch.no_grad():
        for _, names in groups:  # pruned weights must stay exactly zero
            model.get_submodule(names[0]).weight[0, :2] = 0
        before = call(model, inputs)
    zeros = {names[0]: model.get_submodule(names[0]).weight == 0 for _, names in groups}
    for norm_name, names in groups:
        linears = [model.get_submodule(n) for n in names]
        act = torch.rand(linears[0].in_features, dtype=torch.float64) * 50  # outlier-heavy channel maxima
        fold(model.get_submodule(norm_name), linears, smoothing_scales(act, [m.weight for m in linears], 0.5))
    with torch.no_grad():
        after = call(model, inputs)
    rel = float((after - before).abs().max() / before.abs().max())
    assert rel < 1e-4, rel
    for name, mask in zeros.items():
        assert (model.get_submodule(name).weight[mask] == 0).all()
    return rel


def test_smoothquant_leaves_llama_outputs_unchanged(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    adapter = adapter_for("llama", "causal-lm")
    assert len(adapter.smoothing_groups(model)) == 2 * model.config.num_hidden_layers
    ids = torch.randint(0, 30000, (2, 12))
    _equivalence(model, adapter, ids, lambda m, x: m(input_ids=x, use_cache=False).logits)


def test_smoothquant_folds_layernorm_bias_too(vit_dir):
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(vit_dir)
    with torch.no_grad():  # non-trivial LayerNorm biases, so dividing the bias matters
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.bias.normal_()
    adapter = adapter_for("vit", "image-classification")
    _equivalence(model, adapter, torch.randn(2, 3, 32, 32), lambda m, x: m(pixel_values=x).logits)


def test_post_norm_bert_has_no_smoothing_groups(bert_dir):
    from transformers import AutoModel

    assert adapter_for("bert", "feature-extraction").smoothing_groups(AutoModel.from_pretrained(bert_dir)) == []
