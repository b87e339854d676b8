"""FLAP's channel metrics by hand, its reference-form defaults and the statistics each metric reads."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from methods.structured.flap import FLAP


def _flap(**kw) -> FLAP:
    return FLAP(FLAP.Args(method="flap", ratio=0.5, **kw))


def test_metrics_by_hand(weight, stats):
    var = torch.tensor([2.0, 2.0, 0.0])
    torch.testing.assert_close(_flap(metric="ifv").channel(weight, stats), var)
    torch.testing.assert_close(_flap().channel(weight, stats), var * torch.tensor([10.0, 5.0, 1.0]))  # wifv
    wifn = (weight.abs() * torch.tensor([10.0, 4.0, 8.0]).sqrt()).mean(0)
    torch.testing.assert_close(_flap(metric="wifn").channel(weight, stats), wifn)


def test_attention_scores_are_squared_as_the_reference_code_does(weight, stats):
    plain = _flap().channel(weight, stats)
    torch.testing.assert_close(_flap().attention(weight, stats), plain * plain)
    torch.testing.assert_close(_flap(square_attention=False).attention(weight, stats), plain)
    torch.testing.assert_close(_flap().mlp(weight, stats), plain)


def test_reference_form_and_statistics():
    flap = _flap()
    assert (flap.args.structure, flap.args.bias_compensation, flap.metric) == ("AL-AM", True, "wifv")
    assert flap.kinds() == {"mean_var"} and not flap.calibrates_sequentially()
    assert _flap(metric="wifn", bias_compensation=False).kinds() == {"sq_norm"}
    assert _flap(metric="wifn").kinds() == {"sq_norm", "mean_var"}


def test_unknown_metric_is_refused():
    with pytest.raises(ValidationError) as e:
        _flap(metric="fluct")
    assert e.value.errors()[0]["loc"] == ("metric",)
