"""The calibrate stage's gradients (GBLM) are a function of the recipe, not of what ran before."""

from __future__ import annotations

import torch

from pipeline.runner import run
from tasks import load_checkpoint

from ..conftest import text_recipe, write_recipe

GBLM = {"type": "prune_weights", "method": "gblm", "sparsity": 0.5}


def _masks(bert_dir, tmp_path, monkeypatch, tag: str, seed: int = 0) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / f"cache-{tag}"))  # no cached gradients
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, GBLM], calibration={"seed": seed})
    out = run(write_recipe(tmp_path, recipe, f"{tag}.yaml"), output=tmp_path / tag)
    model, _ = load_checkpoint(out / "checkpoint")
    return {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}


def test_simcse_dropout_is_seeded_by_the_recipe(bert_dir, tmp_path, monkeypatch):
    """SimCSE's two views come from dropout: with the global generator moved on between two runs of
    the same recipe the masks stay equal, and the recipe's seed is what changes them."""
    first = _masks(bert_dir, tmp_path, monkeypatch, "a")
    torch.rand(12_345)  # another user of the global generator
    again = _masks(bert_dir, tmp_path, monkeypatch, "b")
    assert all(torch.equal(first[n], again[n]) for n in first)
    other = _masks(bert_dir, tmp_path, monkeypatch, "c", seed=1)
    assert any(not torch.equal(first[n], other[n]) for n in first)
