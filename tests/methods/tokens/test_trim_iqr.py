"""TRIM's IQR outlier count and the K fixed at a percentile of the per-image counts."""

from __future__ import annotations

import numpy as np

from methods.tokens import trim_iqr as trim


def test_trim_iqr_count_and_percentile():
    p = np.array([0.01] * 12 + [0.02, 0.03, 0.30, 0.50])  # Q1 = 0.01, Q3 = 0.0125 -> upper = 0.01625
    assert trim.iqr_count(p) == 4
    assert trim.fixed_k([1, 2, 3, 4, 10], 90, 16) == 8  # 90th percentile 7.6 (linear), rounded up
    assert trim.fixed_k([20, 20], 50, 16) == 15  # one patch always left to aggregate
    sim = np.log(np.stack([p, p[::-1]]))
    assert trim.counts(sim, 1.0) == [4, 4]


def test_summary_reports_the_percentile_used():
    assert trim.summary([1, 2, 3, 4, 10], 90) == {"images": 5, "mean": 4.0, "min": 1, "median": 3.0, "p90": 7.6,
                                                  "max": 10}
