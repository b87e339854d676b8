"""Magnitude: one threshold per matrix, or per M-group."""

from __future__ import annotations

import torch

from methods.weights.magnitude import Magnitude


def test_magnitude_unstructured_and_nm():
    w = torch.tensor([[1.0, -0.5, 0.2, 3.0, -0.1, 0.3, 2.0, 0.4]])
    assert Magnitude(Magnitude.Args(method="magnitude", sparsity=0.25)).mask("l", w, None).sum() == 2
    nm = Magnitude(Magnitude.Args(method="magnitude", pattern="2:4")).mask("l", w, None)
    assert nm.tolist() == [[False, True, True, False, True, True, False, False]]


def test_magnitude_reads_no_data():
    args = Magnitude.Args(method="magnitude", sparsity=0.5, propagation="dense")
    assert not Magnitude.activations and Magnitude.dense_statistics(args) == set()
    assert Magnitude(args).cache_fields() == {}
