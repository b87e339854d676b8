"""Wanda-sp: Wanda's score averaged over the rows; sequential only under per-layer structures."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from methods.structured.wanda_sp import WandaSP


def test_score_by_hand(weight, stats):
    score = WandaSP(WandaSP.Args(method="wanda-sp", ratio=0.5)).channel(weight, stats)
    torch.testing.assert_close(score, (weight.abs() * torch.tensor([10.0, 4.0, 8.0]).sqrt()).mean(0))


def test_baseline_form_and_calibration():
    sp = WandaSP(WandaSP.Args(method="wanda-sp", ratio=0.5))
    assert (sp.args.structure, sp.args.bias_compensation, sp.args.square_attention, sp.metric) == (
        "UL-UM", False, False, None)
    assert sp.kinds() == {"sq_norm"} and sp.calibrates_sequentially()
    assert not WandaSP(WandaSP.Args(method="wanda-sp", ratio=0.5, structure="AL-MM")).calibrates_sequentially()


def test_flap_metric_is_not_a_wanda_sp_argument():
    with pytest.raises(ValidationError) as e:
        WandaSP.Args(method="wanda-sp", ratio=0.5, metric="wifv")
    assert e.value.errors()[0]["type"] == "extra_forbidden"
