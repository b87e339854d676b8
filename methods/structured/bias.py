"""Bias compensation (docs/methods/structured-pruning.md §5): a removed input channel j of a Linear
contributed W[:, j] x_j; replacing x_j by its calibration mean keeps the expected output, so the
removed channels P add b = W[:, P] mu[P] to the bias of the (sliced) Linear."""

from __future__ import annotations

import torch


def compensation(weight: torch.Tensor, removed: torch.Tensor | list[int], mean: torch.Tensor) -> torch.Tensor:
    """b = W[:, P] mu[P] in fp32, from the unsliced ``weight`` [out, in] and the input means [in]."""
    return weight.float()[:, removed] @ mean[removed]
