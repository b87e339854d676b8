"""One projection weight and the statistics of one calibration sequence, computed by hand in the tests."""

from __future__ import annotations

import pytest
import torch

from calibration.collectors import InputStats, Stats


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])  # [out, in]: column norms^2 = 10, 5, 1


@pytest.fixture
def stats() -> Stats:
    x = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 2.0, 2.0]]])  # one sequence, two tokens
    s = InputStats({"mean_var", "sq_norm"})
    s.update(x, None)
    return Stats(s.tensors())  # var (unbiased) = 2, 2, 0; sq_norm = 10, 4, 8
