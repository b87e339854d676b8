"""Per-stage peak memory: a stretch that allocates shows its allocation; a reset forgets earlier peaks."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from core import memory

CPU = torch.device("cpu")


@pytest.mark.skipif(sys.platform != "linux", reason="the per-stage reset is Linux's /proc/self/clear_refs")
def test_each_stretch_has_its_own_peak():
    since = memory.reset_peak(CPU)
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    del big
    with_big = memory.peak(CPU, since)
    assert since == "stage" and with_big["since"] == "stage"

    small = memory.peak(CPU, memory.reset_peak(CPU))
    assert with_big["peak_rss_mib"] - small["peak_rss_mib"] > 300
    assert small["peak_rss_mib"] > 10 and "peak_cuda_mib" not in small
