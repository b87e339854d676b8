"""VisionZip against a float64 loop reference built from HF's own attention map, hidden states and keys;
its D/C split rule and recipe fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.errors import RecipeError
from methods.tokens import SELECTORS
from methods.tokens.visionzip import VisionZip, contextual_count

from .conftest import PATCHES, gathered, pixels, reference_pass, select


def head_mean_keys(vit, layer: int, hidden_in: np.ndarray) -> np.ndarray:
    """[B, T, d_h] keys of block ``layer`` straight from HF's modules, averaged over heads."""
    block = vit.vit.layers[layer]
    with torch.no_grad():
        k = block.attention.k_proj(block.layernorm_before(torch.from_numpy(hidden_in).float()))
    b, t, _ = k.shape
    return k.view(b, t, vit.config.num_attention_heads, -1).double().mean(dim=2).numpy()


def visionzip_reference(cls_att, keys, states, dominant: int, contextual: int):
    """One image, a token at a time: (anchor indices ascending, their tokens) as the reference merges them."""
    top = list(np.argsort(-cls_att, kind="stable")[:dominant])
    rest = [i for i in range(len(states)) if i not in top]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            groups[max(targets, key=lambda t: unit[i] @ unit[t])].append(i)
    tokens = {i: states[i] for i in top}
    for t, members in groups.items():
        tokens[t] = states[t] + (states[members].mean(axis=0) if members else 0.0)
    idx = sorted(tokens)
    return np.array(idx), np.stack([tokens[i] for i in idx])


@pytest.mark.parametrize("k, contextual", [(7, 3), (5, 4), (16, 3)])
def test_visionzip_matches_a_loop_reference(vit, k, contextual):
    x = pixels(4)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", VisionZip(k, contextual), 1, x)
    keys = head_mean_keys(vit, 1, hidden[1])[:, 1:]
    cls_att = attn[1][:, :, 0, 1:].sum(axis=1)
    for b in range(len(x)):
        want_idx, want = visionzip_reference(cls_att[b], keys[b], hidden[2][b, 1:], k - contextual, contextual)
        np.testing.assert_array_equal(idx[b], want_idx)
        np.testing.assert_allclose(features[b], want, atol=1e-5)
    merged = not np.allclose(features, gathered(hidden[2][:, 1:], idx), atol=1e-3)
    assert merged == (k < PATCHES)  # below N some contextual token holds other patches
    if k == PATCHES:  # every remaining patch is a target and nothing is merged: the unpruned tokens
        np.testing.assert_array_equal(idx, np.tile(np.arange(PATCHES), (len(x), 1)))


@pytest.mark.parametrize("k, c", [(64, 10), (128, 20), (192, 30), (16, 3), (8, 2), (2, 1), (1, 0)])
def test_default_split_follows_the_reference_and_keeps_one_of_each_at_small_k(k, c):
    assert contextual_count(k, VisionZip.Args(method="visionzip", keep=k).contextual) == c


def test_contextual_counts_and_ratios():
    assert contextual_count(10, 4) == 4 and contextual_count(10, 0) == 0 and contextual_count(10, 0.0) == 0
    assert contextual_count(10, 0.99) == 9  # ceil(9.9) = 10 is clamped: one dominant token stays


@pytest.mark.parametrize("value, says", [(1.0, r"not a ratio of keep in \[0, 1\)"), (-2, "negative"),
                                         (True, "neither a count"), ("some", "neither a count")])
def test_bad_contextual_is_one_clear_error(value, says):
    with pytest.raises(ValidationError, match=says):
        VisionZip.Args(method="visionzip", keep=8, contextual=value)


def test_contextual_must_leave_a_dominant_token():
    args = VisionZip.Args(method="visionzip", keep=8, contextual=8)
    with pytest.raises(RecipeError, match="leaves no dominant token") as e:
        VisionZip.resolve(args, 1, 2, 8, "s")
    assert e.value.field == "s.contextual"
    assert VisionZip.resolve(VisionZip.Args(method="visionzip", keep=8, contextual=7), 1, 2, 8, "s") is None
    assert SELECTORS["visionzip"] is VisionZip
