"""Intermediate-layer terms: the hooked block outputs are the hidden states transformers reports,
the hooks go away after use, and the squared error skips padding and averages over blocks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from methods.distill import block_outputs, layer_mse
from models.adapters import adapter_for


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32)
        return tf.BertModel(cfg).eval()
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind, task", [("bert", "feature-extraction"), ("llama", "causal-lm")])
def test_hooked_block_outputs_are_the_reported_hidden_states(kind, task):
    model = _tiny(kind)
    blocks = adapter_for(model.config.model_type, task).blocks(model)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # transformers installs its own recording hooks once
    before = [len(b.module._forward_hooks) for b in blocks]
    with torch.no_grad(), block_outputs({b.index: b.module for b in blocks}) as states:
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert sorted(states) == [0, 1, 2]
    # hidden_states[0] is the embedding output; a decoder's last entry is after the final norm
    compared = range(3) if kind == "bert" else range(2)
    for i in compared:
        assert states[i].shape == (2, 7, 32) and torch.allclose(states[i], hidden[i + 1], atol=1e-6)
    assert [len(b.module._forward_hooks) for b in blocks] == before


def test_layer_mse_averages_blocks_over_real_tokens_only():
    teacher = {0: torch.zeros(1, 3, 2), 4: torch.zeros(1, 3, 2)}
    student = {0: torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]]),  # token 2 is padding
               4: torch.tensor([[[2.0, 0.0], [0.0, 0.0], [100.0, 100.0]]]),
               5: torch.full((1, 3, 2), 7.0)}  # not a teacher block: not compared
    mask = torch.tensor([[1, 1, 0]])
    # block 0: tokens (1 + 9) / 2 = 5; block 4: (2 + 0) / 2 = 1; mean over the two blocks: 3
    assert float(layer_mse(student, teacher, mask)) == pytest.approx(3.0)
    assert float(layer_mse(student, teacher, None)) == pytest.approx(((1 + 9 + 1e4) / 3 + (2 + 0 + 1e4) / 3) / 2)
