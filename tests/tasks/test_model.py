"""TaskModel: the deployed signature per task, and the token-pruner protocol."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import ModelSpec
from tasks import TASKS, TaskModel
from tasks.model import TOKEN_PRUNER, token_pruner


def test_signature_is_the_tasks(llama_onnx):
    tm, _, proto, (ids,) = llama_onnx
    assert (tm.input_names, tm.output_names) == (("input_ids",), ("logits",))
    assert [i.name for i in proto.graph.input] == ["input_ids"] and [o.name for o in proto.graph.output] == ["logits"]
    torch.testing.assert_close(tm(ids)[0], tm.model(input_ids=ids).logits)
    for name, task in TASKS.items():
        wrapped = TaskModel(nn.Identity(), ModelSpec(source="x", task=name))
        assert (wrapped.input_names, wrapped.output_names) == (task.input_names, task.output_names)


class _Pruner:
    """A stand-in token pruner: one extra input with a default, outputs replaced."""

    input_names = ("text_embeds",)
    output_names = ("image_features", "token_index")

    def __init__(self):
        self.seen = None

    def default(self, name, batch):
        return torch.full((batch, 2), 7.0)

    def run(self, forward, inputs):
        self.seen = inputs
        emb, hidden = forward()
        return hidden[:, :2], torch.arange(2).expand(len(hidden), 2)


def test_a_token_pruner_adds_inputs_and_replaces_outputs():
    class Encoder(nn.Module):
        def forward(self, pixel_values):
            hidden = pixel_values.flatten(1)[:, None, :].expand(-1, 3, -1)
            return type("Out", (), {"last_hidden_state": hidden})()

    model = Encoder()
    pruner = _Pruner()
    model.__dict__[TOKEN_PRUNER] = pruner
    assert token_pruner(model) is pruner and token_pruner(nn.Identity()) is None
    tm = TaskModel(model, ModelSpec(source="x", task="image-feature-extraction"))
    assert tm.input_names == ("pixel_values", "text_embeds") and tm.output_names == pruner.output_names
    assert TASKS["image-feature-extraction"].input_names == ("pixel_values",)  # the class signature is untouched
    example = tm.example({"pixel_values": torch.ones(2, 1, 2, 2)})
    assert torch.equal(example[1], torch.full((2, 2), 7.0))
    features, index = tm(*example)
    assert features.shape == (2, 2, 4) and torch.equal(pruner.seen["text_embeds"], example[1])
    assert index.tolist() == [[0, 1], [0, 1]]
