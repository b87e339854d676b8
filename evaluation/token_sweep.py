"""The token_prune stage's ``sweep`` (stages/token_prune.py): quality against K on the calibration images, for report.md.

One pass over the calibration images per K (the selector rebuilt at that K, placed as the recipe
places it), compared with the unpruned encoder: for a classifier the top-1 agreement with it and,
when the images carry labels (class subfolders), the top-1 accuracy; for an encoder the mean cosine
of its outputs. K = N (every patch) is the unpruned encoder itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.plots import line_plot
from methods.tokens.trim import mean_cosine

TITLE = "quality against K (calibration images)"


def sweep(keeps: list[int], patches: int, unpruned: np.ndarray, outputs: dict[int, np.ndarray],
          labels: torch.Tensor | None, classifies: bool) -> dict[str, dict[int, float]]:
    """metric -> {K: value}, K = ``patches`` included (the unpruned encoder)."""
    every = {**outputs, patches: unpruned}
    ks = sorted({*keeps, patches})
    if not classifies:
        return {"mean cosine to unpruned": {k: mean_cosine(unpruned, every[k]) for k in ks}}
    top = {k: every[k].argmax(-1) for k in ks}
    out = {"top-1 agreement with unpruned": {k: round(float((top[k] == top[patches]).mean()), 4) for k in ks}}
    if labels is not None:
        y = labels.numpy()
        out["top-1 accuracy"] = {k: round(float((top[k] == y).mean()), 4) for k in ks}
    return out


def report(result: dict[str, dict[int, float]], folder: Path,
           workdir: Path) -> tuple[list[str], list[list], dict[str, str]]:
    """The table's headers and rows (titled TITLE) and the figure (PNG in the stage folder, linked from
    report.md)."""
    ks = sorted(next(iter(result.values())))
    headers, rows = ["K", *result], [[k, *(values[k] for values in result.values())] for k in ks]
    path = folder / "quality_vs_k.png"
    line_plot(path, ks, {name: [values[k] for k in ks] for name, values in result.items()}, TITLE,
              "K (patch tokens kept)", "fraction", markers=True)
    return headers, rows, {TITLE: path.relative_to(workdir).as_posix()}
