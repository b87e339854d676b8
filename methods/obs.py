"""Optimal Brain Surgeon pieces shared by the methods that fix a Linear's columns one at a time and
push each column's error onto the columns not fixed yet: SparseGPT (zeroing, arXiv 2301.00774) and
GPTQ (rounding, arXiv 2210.17323). Both read the layer-wise Hessian ``H = 2 X^T X / tokens`` of
the calibration inputs (calibration/collectors.py, kind ``hessian``) and walk the columns with one
upper Cholesky factor of its damped inverse (docs/methods/weight-pruning.md §10.2).
"""

from __future__ import annotations

import torch


def usable_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H with the inputs the calibration data never excited (diag 0) set to 1, so it inverts, and
    those inputs (their weights are zeroed: nothing measured says what they do)."""
    if hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    return hessian, dead


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + lambda I)^-1, lambda = dampening * mean(diag H) (fp64).

    Row i of U is the OBS update of the columns > i when column i is fixed, given columns < i are
    already fixed: the whole sequential solve in one Cholesky factor (docs/methods/weight-pruning.md §10.2).

    Computed without forming the inverse: with J the reversal, J chol(J H J) J = M is upper and H = M M^T,
    so U = M^-1 (upper, positive diagonal: the unique factor). One Cholesky and one triangular solve
    instead of Cholesky, inverse and a second Cholesky: 1.7x less time at K = 2048 (the 8192-wide
    down_proj of a 3B model spends minutes here), equal to 3e-15.
    """
    h = hessian.double().clone()
    h.diagonal().add_(dampening * h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    return torch.linalg.solve_triangular(upper, eye, upper=True)


def fp32_factor(hessian: torch.Tensor, dampening: float, name: str = "layer") -> torch.Tensor:
    """The factor in fp32 for the column loop, entries below fp32's normal range set to 0: far
    from the diagonal they decay into denormals, which make every CPU update 5x slower.

    A damped H without a Cholesky factor is an error naming ``name``: falling back to an identity
    would silently turn the method into its uncompensated baseline (magnitude pruning, rounding)."""
    try:
        u = inverse_hessian_factor(hessian, dampening)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"{name}: the damped Hessian is not positive definite ({e}); "
                         f"raise 'dampening' (now {dampening})") from e
    return u.masked_fill(u.abs() < torch.finfo(torch.float32).tiny, 0).float()
