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
    dead = hessian.diagonal() == 0
    if dead.any():  # a copy only then: a 3B model's down_proj Hessian is 512 MiB
        hessian = hessian.clone()
        hessian[dead, dead] = 1
    return hessian, dead


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + lambda I)^-1, lambda = dampening * mean(diag H) (fp64).

    Row i of U is the OBS update of the columns > i when column i is fixed, given columns < i are
    already fixed: the whole sequential solve in one Cholesky factor (docs/methods/weight-pruning.md §10.2).

    Computed without forming the inverse: with J the reversal, J chol(J H J) J = M is upper and H = M M^T,
    so U = M^-1 (upper, positive diagonal: the unique factor). One Cholesky and one triangular inverse
    instead of Cholesky, inverse and a second Cholesky: 1.7x less time at K = 2048 (the 8192-wide
    down_proj of a 3B model spends minutes here), equal to 3e-15. At most three K x K matrices are
    held at once beside H (1.5 GiB at K = 8192; five before).
    """
    reversed_h = hessian.double().flip(0, 1)  # a copy, damped in place (its diagonal is H's, reversed)
    reversed_h.diagonal().add_(dampening * hessian.diagonal().double().mean())
    lower = torch.linalg.cholesky(reversed_h)
    del reversed_h
    upper = lower.flip(0, 1)
    del lower
    return upper_inverse(upper)


def upper_inverse(upper: torch.Tensor, columns: int = 1024) -> torch.Tensor:
    """The inverse of an upper-triangular matrix, ``columns`` at a time: column j of it has rows <= j
    only, so a block of columns solves the leading rows alone (a third of the work of one solve
    against the identity, 2x less time at K = 3072) and no K x K identity is built. Equal to the
    whole solve within 1e-15."""
    k = upper.shape[0]
    out = torch.zeros_like(upper)
    for start in range(0, k, columns):
        end = min(start + columns, k)
        rhs = torch.zeros(end, end - start, dtype=upper.dtype, device=upper.device)
        rhs[start:].fill_diagonal_(1)
        out[:end, start:end] = torch.linalg.solve_triangular(upper[:end, :end], rhs, upper=True)
    return out


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
    tiny = torch.finfo(torch.float32).tiny
    return u.masked_fill_((u < tiny) & (u > -tiny), 0).float()  # in place: no K x K fp64 |u| and copy
