"""[CLS] attention against HF's own attention map, and the score-weighted fused token."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from methods.tokens import SELECTORS
from methods.tokens.cls_attention import ClsAttention

from .conftest import PATCHES, gathered, pixels, reference_pass, select, top_k_sorted


def test_cls_attention_is_hf_cls_row_of_the_layer(vit):
    x = pixels(0)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", ClsAttention(5), 1, x)
    want = top_k_sorted(attn[1][:, :, 0, 1:].mean(axis=1), 5)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features, gathered(hidden[2][:, 1:], want), atol=1e-6)


def test_fused_token_is_the_score_weighted_mean_of_dropped_patches(vit):
    x = pixels(2)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", ClsAttention(4), 1, x, fuse=True)
    score, patches = attn[1][:, :, 0, 1:].mean(axis=1), hidden[2][:, 1:]
    for b in range(len(idx)):
        rest = np.setdiff1d(np.arange(PATCHES), idx[b])
        w = score[b, rest] / score[b, rest].sum()
        np.testing.assert_allclose(features[b, -1], w @ patches[b, rest], atol=1e-6)
    assert features.shape == (2, 4 + 1, 32)


def test_args_need_keep_and_do_not_fuse_by_default():
    assert SELECTORS["cls_attention"] is ClsAttention
    args = ClsAttention.Args(method="cls_attention", keep=0.25)
    assert (args.keep, args.fuse) == (0.25, False)
    with pytest.raises(ValidationError, match="keep is required"):
        ClsAttention.Args(method="cls_attention")
