"""HiPrune against the reference's steps (with ``unique``), and its own recipe checks."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import RecipeError
from methods.tokens import SELECTORS
from methods.tokens.hiprune import HiPrune, anchor_count

from .conftest import GRID, pixels, reference_pass, select


def hiprune_reference(obj: np.ndarray, deep: np.ndarray, k: int, anchors: int, width: int) -> np.ndarray:
    """HiPrune's reference steps for one image: anchors, ±1/±W buffers, unique, registers (docs/methods/token-pruning.md §8.2)."""
    n = deep.size
    a = np.argsort(-obj, kind="stable")[:anchors]
    buffers = np.concatenate([a, a - 1, a + 1, a - width, a + width]).clip(0, n - 1)
    ab = np.unique(buffers)
    registers = deep.copy()
    registers[ab] -= 1
    rest = np.argsort(-registers, kind="stable")[:k - len(ab)]
    return np.sort(np.concatenate([ab, rest]))


def test_hiprune_matches_reference_with_unique(vit):
    x = pixels(4)
    attn, _ = reference_pass(vit, x)
    method = HiPrune(8, anchors=1)
    _, idx = select(vit, "image-classification", method, 1, x, object_layer=0)
    obj, deep = attn[0].mean(axis=(1, 2))[:, 1:], attn[1].mean(axis=(1, 2))[:, 1:]
    want = np.stack([hiprune_reference(obj[b], deep[b], 8, 1, GRID) for b in range(2)])
    np.testing.assert_array_equal(idx, want)


def args(**kw):
    return HiPrune.Args(method="hiprune", **{"keep": 64, **kw})


def test_anchor_count_and_build_follow_the_reference():
    assert [anchor_count(k, 0.1) for k in (192, 128, 64)] == [4, 3, 1]  # token-pruning.md §8.2
    built = HiPrune.build(args(alpha=0.5), 20, env=None)
    assert (built.method.k, built.method.anchors, built.defaults, built.companions) == (20, 2, {}, ())
    assert SELECTORS["hiprune"] is HiPrune


def test_resolve_defaults_the_object_layer_and_checks_alpha():
    assert HiPrune.resolve(args(), 22, 24, 64, "s") == 8  # LLaVA: object layer 9 of feature layer 23 (1-based)
    assert HiPrune.resolve(args(object_layer=-24), 5, 24, None, "s") == 0
    with pytest.raises(RecipeError, match="comes after the pruning layer") as e:
        HiPrune.resolve(args(object_layer=6), 5, 24, 64, "s")
    assert e.value.field == "s.object_layer"
    with pytest.raises(RecipeError, match="layer 24 does not exist") as e:
        HiPrune.resolve(args(object_layer=24), 5, 24, 64, "s")
    assert e.value.field == "s.object_layer"
    with pytest.raises(RecipeError, match="3 anchors") as e:
        HiPrune.resolve(args(alpha=1.0), 5, 24, 14, "s")
    assert e.value.field == "s.alpha"
