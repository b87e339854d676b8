"""The pruner's hooks: later blocks run on the kept tokens; removing it restores the encoder."""

from __future__ import annotations

import numpy as np
import torch

from methods.tokens.cls_attention import ClsAttention
from methods.tokens.pruner import Placement, TokenPruner
from models.adapters import adapter_for
from tasks.model import token_pruner

from .conftest import pixels, reference_pass


def test_inside_placement_runs_later_blocks_on_the_kept_tokens(vit):
    x = pixels(6)
    _, hidden = reference_pass(vit, x)
    pruner = TokenPruner(vit, adapter_for("vit", "image-classification"), ClsAttention(5), Placement(0, False, False))
    try:
        with torch.no_grad():
            logits = vit(pixel_values=x).logits
        idx = pruner.last_index
        assert pruner.describe() == {"method": "cls_attention", "layer": 0, "fuse": False, "output": False,
                                     "object_layer": None, "patches": 16, "keep": 5, "tokens_out": 1 + 5}
    finally:
        pruner.remove()
    h = torch.from_numpy(hidden[1]).float()
    kept = torch.cat([h[:, :1], torch.stack([h[b, 1:][idx[b]] for b in range(2)])], dim=1)
    with torch.no_grad():
        want = vit.classifier(vit.vit.layernorm(vit.vit.layers[1](kept, None))[:, 0])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert kept.shape[1] == 1 + 5


def test_remove_restores_the_unpruned_encoder(vit):
    x = pixels(7)
    with torch.no_grad():
        dense = vit(pixel_values=x).logits
    TokenPruner(vit, adapter_for("vit", "image-classification"), ClsAttention(3), Placement(0, True, False)).remove()
    assert token_pruner(vit) is None
    with torch.no_grad():
        np.testing.assert_array_equal(vit(pixel_values=x).logits.numpy(), dense.numpy())
