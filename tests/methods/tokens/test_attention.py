"""The side-branch attention equals HF's own eager attention map of the block."""

from __future__ import annotations

import numpy as np
import torch

from methods.tokens.attention import attention_probs, cls_attention, global_attention
from models.adapters import adapter_for

from .conftest import pixels, reference_pass


def test_side_branch_recomputes_the_blocks_attention(vit):
    x = pixels(8)
    attn, hidden = reference_pass(vit, x)
    block = adapter_for("vit", "image-classification").blocks(vit)[1]
    h = torch.from_numpy(hidden[1]).float()
    with torch.no_grad():
        full = attention_probs(vit, block, h, cls_only=False)
        first = attention_probs(vit, block, h, cls_only=True)
        cls, glob = cls_attention(vit, block, h, 1), global_attention(vit, block, h, 1)
    assert full.dtype == torch.float32 and full.shape == (2, 4, 17, 17) and first.shape == (2, 4, 1, 17)
    np.testing.assert_allclose(full.numpy(), attn[1], atol=1e-6)
    np.testing.assert_allclose(first.numpy(), attn[1][:, :, :1], atol=1e-6)
    np.testing.assert_allclose(cls.numpy(), attn[1][:, :, 0, 1:].mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(glob.numpy(), attn[1].mean(axis=(1, 2))[:, 1:], atol=1e-6)
