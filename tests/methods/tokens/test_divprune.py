"""DivPrune against a float64 brute-force greedy max-min reference."""

from __future__ import annotations

import numpy as np
import torch

from methods.tokens import SELECTORS
from methods.tokens.base import Tap
from methods.tokens.divprune import DivPrune

from .conftest import gathered, pixels, reference_pass, select


def divprune_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Greedy max-min diversity (DivPrune, docs/methods/token-pruning.md §7.2) on one image's tokens [N, D], float64."""
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    dist = 1.0 - xn @ xn.T
    picked = [int(np.argmax(np.sort(dist, axis=0)[1]))]
    while len(picked) < k:
        m = dist[picked].min(axis=0)
        m[picked] = -np.inf
        picked.append(int(np.argmax(m)))
    return np.sort(picked)


def test_divprune_is_greedy_max_min(vit):
    x = pixels(3)
    _, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", DivPrune(7), 1, x)
    want = np.stack([divprune_reference(h[1:], 7) for h in hidden[2]])
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features, gathered(hidden[2][:, 1:], want), atol=1e-6)


def test_duplicated_patches_are_never_picked_twice():
    """Identical rows have distance ~0 to each other; the -1 rule still yields K distinct picks (§7.4)."""
    row = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(0))
    patches = torch.cat([row.expand(1, 5, 8), torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))], 1)
    x = torch.cat([torch.zeros(1, 1, 8), patches], dim=1)  # [CLS] + 8 patches
    idx, weights, tokens = DivPrune(6).select(Tap(None, None, x, x, prefix=1, cols=4))
    assert weights is None and tokens is None and idx.shape == (1, 6)
    assert len(set(idx[0].tolist())) == 6 and idx[0].tolist() == sorted(idx[0].tolist())
    assert SELECTORS["divprune"] is DivPrune and DivPrune.Args(method="divprune", keep=3).fuse is False
