"""GBLM's score by hand; its own arguments key the sequential statistics and belong to it alone."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from calibration.collectors import InputStats, Stats
from methods.weights.gblm import GBLM
from methods.weights.wanda import Wanda

GRADS = {"l": {"grad_sum_sq": torch.tensor([[9.0, 0.0], [16.0, 1.0]]),
               "grad_sum_abs": torch.tensor([[3.0, 0.0], [5.0, 1.0]])}}


def _stats(x: torch.Tensor) -> Stats:
    s = InputStats(GBLM.activations)
    s.update(x, None)
    return Stats(s.tensors())


def test_gblm_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    x = torch.tensor([[[1.0, 2.0]]])
    l2 = GBLM(GBLM.Args(method="gblm", sparsity=0.5), GRADS).score("l", w, _stats(x))
    # |W| sqrt(s) + |W| * 100 * sqrt(sum g^2)
    expected = torch.tensor([[1 * 1 + 1 * 300, 2 * 2 + 0], [0.5 * 1 + 0.5 * 400, 4 * 2 + 4 * 100]])
    torch.testing.assert_close(l2, expected)
    args = GBLM.Args(method="gblm", sparsity=0.5, gradient_norm="l1", gradient_scale=10)
    l1 = GBLM(args, GRADS).score("l", w, _stats(x))
    torch.testing.assert_close(l1, torch.tensor([[1 + 30.0, 4.0], [0.5 + 25.0, 8 + 40.0]]))


def test_gblm_declares_gradients_and_keys_the_cache_with_its_own_arguments():
    assert GBLM.needs_gradients and GBLM.activations == Wanda.activations
    args = GBLM.Args(method="gblm", pattern="2:4", gradient_norm="l1", gradient_scale=10)
    assert GBLM(args).cache_fields() == {"gradient_norm": "l1", "gradient_scale": 10.0}
    assert GBLM(GBLM.Args(method="gblm", pattern="2:4")).cache_fields() == {"gradient_norm": None,
                                                                             "gradient_scale": None}


@pytest.mark.parametrize("kw, field", [({"gradient_norm": "l3"}, "gradient_norm"),
                                       ({"gradient_scale": 0}, "gradient_scale")])
def test_gblm_arguments_are_checked(kw, field):
    with pytest.raises(ValidationError) as e:
        GBLM.Args(method="gblm", sparsity=0.5, **kw)
    assert e.value.errors()[0]["loc"] == (field,)


def test_wanda_refuses_gblm_arguments():
    with pytest.raises(ValidationError) as e:
        Wanda.Args(method="wanda", sparsity=0.5, gradient_norm="l1")
    assert e.value.errors()[0]["type"] == "extra_forbidden"
