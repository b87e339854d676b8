"""Random-K (docs/methods/token-pruning.md §12): the baseline every selector must beat — K patches chosen on the host.

The indices are a graph input, ``keep_idx`` [B, K] int64 (distinct patch indices in [0, N), any
order: the graph sorts them into raster order), so the host draws a fresh subset per image, seeded
by (seed, image id) (`per_image`: what `pipeline generate` and the benchmarks draw). Where no host
supplies them (the pipeline's calibration, sweep, parity and evaluate passes) every image gets the
default: one subset drawn with ``seed``, i.e. a fixed pattern.
Recipe: ``{type: token_prune, method: random, layer: -2, keep: 16, output: true, seed: 0}``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .base import SELECTORS, Build, Method, Selection, SelectorArgs
from .select import raster_order


def draw(patches: int, k: int, seed: int) -> torch.Tensor:
    """[k] int64: a uniform random subset of the patch indices, ascending, reproducible from ``seed``."""
    return torch.randperm(patches, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def per_image(patches: int, k: int, seed: int, image: int) -> np.ndarray:
    """[k] int64: the host's subset for one image, uniform, ascending, reproducible from (seed, image id)."""
    return np.sort(np.random.default_rng([seed, image]).permutation(patches)[:k]).astype(np.int64)


@SELECTORS.register
class RandomK(Method):
    name = "random"
    inputs = ("keep_idx",)

    class Args(SelectorArgs):
        method: Literal["random"]
        seed: int = Field(default=0, ge=0)  # of the default keep_idx (the subset used where the host gives none)

    def select(self, tap):
        return Selection(raster_order(tap.inputs["keep_idx"]))

    @classmethod
    def build(cls, args, k, env):
        return Build(cls(k), {"keep_idx": draw(env.adapter.vision_tokens(env.model).patches, k, args.seed)[None]})
