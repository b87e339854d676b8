"""The prune_weights stage: recipe arguments from the criteria, calibration needs and the statistics
cache key derived from each criterion's declarations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from calibration.cache import state_digest
from core.errors import RecipeError
from methods.weights import CRITERIA
from pipeline.recipe import _validate, parse_recipe
from stages.context import Statistics
from stages.prune_weights import PruneWeights

from ..conftest import text_recipe


def _args(**kw):
    return _validate(PruneWeights.Args, {"type": "prune_weights", **kw}, "stages[1]")


@pytest.mark.parametrize("kw, needs, kinds, text", [
    ({"method": "magnitude", "pattern": "2:4"}, False, set(), "magnitude 2:4"),
    ({"method": "wanda", "sparsity": 0.5}, "data", set(), "wanda unstructured 0.5"),
    ({"method": "wanda", "sparsity": 0.5, "propagation": "dense"}, "dense-statistics", {"sq_norm"},
     "wanda unstructured 0.5"),
    ({"method": "gblm", "pattern": "4:8"}, "dense-statistics", {"gradients"}, "gblm 4:8"),
    ({"method": "sparsegpt", "pattern": "2:4"}, "data", set(), "sparsegpt 2:4"),
    ({"method": "sparsegpt", "sparsity": 0.5, "propagation": "dense"}, "dense-statistics", {"hessian"},
     "sparsegpt unstructured 0.5"),
])
def test_calibration_needs_come_from_the_criterion(kw, needs, kinds, text):
    args = _args(**kw)
    assert PruneWeights.needs_calibration(args) == needs and PruneWeights.statistics(args) == kinds
    assert PruneWeights.describe(args) == text


def test_recipe_keys_are_the_criterions_own():
    args = _args(method="gblm", sparsity=0.4, gradient_norm="l1", name="g")
    assert (args.type, args.name, args.method, args.gradient_norm, args.target_sparsity) == (
        "prune_weights", "g", "gblm", "l1", 0.4)
    assert list(_args(method="wanda", pattern="2:4").model_dump())[:3] == ["type", "name", "method"]


@pytest.mark.parametrize("kw, field, words", [
    ({"method": "wanda", "sparsity": 0.5, "gradient_norm": "l1"}, "stages[1].gradient_norm", "unknown key"),
    ({"method": "magnitude", "sparsity": 0.5, "gradient_scale": 3}, "stages[1].gradient_scale", "unknown key"),
    ({"method": "obs", "sparsity": 0.5}, "stages[1].method", "'obs' is not allowed; allowed: "),
    ({"method": "sparsegpt", "pattern": "2:4", "blocksize": 6}, "stages[1]", "blocksize 6 must be a multiple"),
    ({"method": "gblm", "sparsity": 0.5, "gradient_norm": "l3"}, "stages[1].gradient_norm", "'l3' is not allowed"),
    ({"method": "wanda", "pattern": "2:4", "sparsity": 0.3}, "stages[1]", "contradicts pattern 2:4"),
    ({"method": "wanda", "sparsity": 1.5}, "stages[1].sparsity", "out of range"),
])
def test_recipe_errors_name_the_field(bert_dir, kw, field, words):
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, {"type": "prune_weights", **kw}])
    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe)
    assert e.value.field == field and words in e.value.message, str(e.value)
    if field.endswith(".method"):
        assert sorted(e.value.message.split("allowed: ")[1].split(", ")) == ["gblm", "magnitude", "sparsegpt", "wanda"]


def _key(gradients_key: str, **kw) -> str:
    model = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(model.weight, 0.5)
    torch.nn.init.zeros_(model.bias)
    ctx = SimpleNamespace(model=model, model_digest=lambda: state_digest(model), calibration=SimpleNamespace(sha256="data"),
                          recipe=SimpleNamespace(calibration=SimpleNamespace(dtype="float32")),
                          statistics=Statistics(gradients_key=gradients_key))
    stage = PruneWeights(_args(sparsity=0.5, **kw))
    return stage._sequential_key(ctx, {"0": model}, CRITERIA[kw["method"]](stage.args))


def test_sequential_cache_key_follows_the_criterions_own_arguments():
    """Block l's statistics depend on how blocks < l were pruned: every GBLM setting, and its gradients."""
    l2 = _key("g1", method="gblm")
    assert l2 == _key("g1", method="gblm")
    assert len({l2, _key("g1", method="gblm", gradient_norm="l1"), _key("g1", method="gblm", gradient_scale=10),
                _key("g2", method="gblm"), _key("g1", method="wanda")}) == 5
    assert _key("g1", method="wanda") == _key("g2", method="wanda")  # Wanda reads no gradients
    sparsegpt = {_key("g1", method="sparsegpt"), _key("g1", method="sparsegpt", dampening=0.1),
                 _key("g1", method="sparsegpt", blocksize=64), _key("g2", method="sparsegpt")}
    assert len(sparsegpt) == 3  # its updates reach downstream activations; it reads no gradients
