"""Global attention against HF's own attention map (column mean over heads and queries)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from methods.tokens import SELECTORS
from methods.tokens.global_attention import GlobalAttention

from .conftest import gathered, pixels, reference_pass, select, top_k_sorted


def test_global_attention_is_hf_column_mean(vit):
    x = pixels(1)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", GlobalAttention(6), 0, x)
    want = top_k_sorted(attn[0].mean(axis=(1, 2))[:, 1:], 6)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features, gathered(hidden[1][:, 1:], want), atol=1e-6)


def test_args_are_keep_and_fuse_only():
    assert SELECTORS["global_attention"] is GlobalAttention
    assert set(GlobalAttention.Args.model_fields) == {"method", "keep", "fuse"}
    with pytest.raises(ValidationError, match="extra"):
        GlobalAttention.Args(method="global_attention", keep=6, alpha=0.5)
