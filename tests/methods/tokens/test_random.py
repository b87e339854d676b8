"""Random-K: the host's indices in raster order whatever their order, and the seeded default subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from methods.tokens import SELECTORS
from methods.tokens.base import Env
from methods.tokens.random import RandomK, draw
from models.adapters import adapter_for

from .conftest import PATCHES, gathered, pixels, reference_pass, select


def test_random_keeps_the_given_indices_in_raster_order(vit):
    x = pixels(1)
    _, hidden = reference_pass(vit, x)
    given = torch.tensor([[9, 2, 15, 4], [0, 11, 7, 3]])
    features, idx = select(vit, "image-classification", RandomK(4), 1, x, fuse=True, keep_idx=given)
    want = np.sort(given.numpy(), axis=-1)
    np.testing.assert_array_equal(idx, want)
    patches = hidden[2][:, 1:]
    np.testing.assert_allclose(features[:, :4], gathered(patches, want), atol=1e-6)
    for b in range(2):
        np.testing.assert_allclose(features[b, 4], np.delete(patches[b], want[b], axis=0).mean(axis=0), atol=1e-6)


def test_default_subset_is_seeded_uniform_and_distinct(vit):
    subsets = {tuple(draw(PATCHES, 6, seed).tolist()) for seed in range(20)}
    assert len(subsets) > 15 and all(len(set(s)) == 6 and list(s) == sorted(s) for s in subsets)
    assert all(0 <= i < PATCHES for s in subsets for i in s)
    assert draw(PATCHES, 6, 3).tolist() == draw(PATCHES, 6, 3).tolist()
    built = RandomK.build(RandomK.Args(method="random", keep=6, seed=3), 6,
                          Env(vit, adapter_for("vit", "image-classification"), 2))
    assert built.defaults["keep_idx"].tolist() == [draw(PATCHES, 6, 3).tolist()] and RandomK.inputs == ("keep_idx",)


def test_args():
    assert SELECTORS["random"] is RandomK and RandomK.Args(method="random", keep=4).seed == 0
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        RandomK.Args(method="random", keep=4, seed=-1)
