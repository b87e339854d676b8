"""SmoothQuant: migrate activation outliers into the weights before W8A8 (arXiv 2211.10438;
docs/methods/quantization.md §4).

For each pre-norm and the Linears that read only its output (q/k/v; gate/up or fc1), per input
channel j:

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)      (max over the rows of every Linear in the group)

then W' = W diag(s) and the norm's weight (and bias) are divided by s, so the norm emits X / s and
the model computes the same function with no op added. As in the reference implementation
(mit-han-lab/smoothquant ``smooth_ln_fcs``) the weight maxima and the scales are clamped at 1e-5,
which also keeps all-zero (pruned) columns finite; zeros stay zeros.

Recipe: ``{type: smoothquant, alpha: 0.5}``.
"""

from __future__ import annotations

import torch
from torch import nn

CLAMP = 1e-5


def smoothing_scales(act_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:j|^(1-alpha) over every weight [out, in] of the group."""
    w_max = torch.cat([w.detach().abs().double() for w in weights]).amax(0).clamp_min(CLAMP)
    return (act_abs_max.double().pow(alpha) / w_max.pow(1 - alpha)).clamp_min(CLAMP)


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Linear], scales: torch.Tensor, offset: float = 0.0) -> None:
    """X' = X / s through the norm's affine parameters, W' = W diag(s): the same function.

    ``offset``: the norm scales by (offset + weight) (Gemma: 1), so that sum is what is divided.
    """
    norm.weight.copy_(((norm.weight.double() + offset) / scales - offset).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() / scales).to(norm.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * scales).to(lin.weight.dtype))


def outlier_ratio(act_abs_max: torch.Tensor) -> float:
    """max / mean of the per-channel max|x|: how far the worst channel sticks out (1 = flat)."""
    return float(act_abs_max.max() / act_abs_max.mean().clamp_min(1e-12))
