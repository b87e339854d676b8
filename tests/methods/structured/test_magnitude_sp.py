"""Magnitude-sp: column L2 norms; no calibration data unless bias compensation asks for the means."""

from __future__ import annotations

import torch

from methods.structured.magnitude_sp import MagnitudeSP


def test_score_by_hand(weight):
    score = MagnitudeSP(MagnitudeSP.Args(method="magnitude-sp", ratio=0.5)).channel(weight, None)
    torch.testing.assert_close(score, torch.tensor([10.0, 5.0, 1.0]).sqrt())


def test_reads_data_only_for_bias_compensation():
    assert MagnitudeSP(MagnitudeSP.Args(method="magnitude-sp", ratio=0.5)).kinds() == set()
    args = MagnitudeSP.Args(method="magnitude-sp", ratio=0.5, bias_compensation=True)
    assert MagnitudeSP(args).kinds() == {"mean_var"}
