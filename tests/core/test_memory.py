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
    start = memory.reset_peak(CPU)
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    del big
    with_big = memory.peak(CPU, start)
    assert start["since"] == "stage" and with_big["since"] == "stage"
    assert with_big["peak_rss_mib"] - with_big["start_rss_mib"] > 380  # the stretch's own share

    held = np.ones(200 * 2**20 // 8)  # held across the next reset: counted at its start
    small = memory.peak(CPU, memory.reset_peak(CPU))
    assert with_big["peak_rss_mib"] - small["peak_rss_mib"] > 150
    assert small["start_rss_mib"] - with_big["start_rss_mib"] > 180 and small["peak_rss_mib"] - small["start_rss_mib"] < 20
    del held
    assert small["peak_rss_mib"] > 10 and "peak_cuda_mib" not in small
