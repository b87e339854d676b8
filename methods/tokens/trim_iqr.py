"""TRIM's adaptive token count, fixed once on calibration data so the graph keeps a static K.

The paper keeps the outliers of the selection probabilities p = softmax(±s) above
Q3 + 1.5·IQR (docs/methods/token-pruning.md §4.2 step 3), a count that varies per image. Calibration runs that exact rule
on every calibration image (one image at a time: the reference flattens the batch, which couples
images) and fixes K at a percentile of the counts (token-pruning.md §4.3).
"""

from __future__ import annotations

import math

import numpy as np


def iqr_count(prob: np.ndarray) -> int:
    """The reference's n_keep for one image's probabilities [N] (NumPy linear percentiles)."""
    q1, q3 = np.percentile(prob, [25, 75])
    upper = q3 + 1.5 * (q3 - q1)
    n = prob.size
    ratio = float((prob > upper).sum()) / n
    return int(n * ratio)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def counts(similarity: np.ndarray, sign: float) -> list[int]:
    """Per-image counts for similarities [B, N] under one sign."""
    return [iqr_count(p) for p in softmax(sign * similarity.astype(np.float64))]


def fixed_k(per_image: list[int], percentile: float, patches: int) -> int:
    """K = the percentile of the per-image counts, rounded up, within [1, N-1] (one token is always aggregated)."""
    return int(min(max(math.ceil(np.percentile(per_image, percentile)), 1), patches - 1))


def summary(per_image: list[int], percentile: float) -> dict:
    c = np.asarray(per_image)
    return {"images": int(c.size), "mean": round(float(c.mean()), 2), "min": int(c.min()),
            "median": float(np.median(c)), f"p{percentile:g}": round(float(np.percentile(c, percentile)), 2),
            "max": int(c.max())}
