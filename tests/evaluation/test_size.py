"""Size: parameters and non-zeros always; FLOPs and bytes when both graphs are given."""

from __future__ import annotations

import torch
from torch import nn

from evaluation.size import nonzero, params, size


def test_params_and_nonzeros():
    dense = nn.Linear(4, 3)
    sparse = nn.Linear(4, 3)
    with torch.no_grad():
        sparse.weight[:, :2] = 0
    assert params(dense) == params(sparse) == 15 and nonzero(sparse) == 9
    assert size(dense, sparse) == {"dense": {"params": 15, "nonzero_params": nonzero(dense)},
                                   "compressed": {"params": 15, "nonzero_params": 9}}


def test_onnx_flops_and_bytes(llama_onnx):
    tm, path, _, _ = llama_onnx
    out = size(tm.model, tm.model, path, path)
    assert out["dense"] == out["compressed"] and out["dense"]["onnx_bytes"] >= path.stat().st_size
    c = tm.model.config
    blocks = c.num_hidden_layers * 16 * 2 * c.hidden_size * (
        2 * c.hidden_size + 2 * c.num_key_value_heads * c.head_dim + 3 * c.intermediate_size)
    assert out["dense"]["flops"] >= blocks  # every block Linear counted (plus attention and the head)
