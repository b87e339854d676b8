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
    if dead.any():  # a copy only then: a 3B model's down_proj Hessian is 256 MiB
        hessian = hessian.clone()
        hessian[dead, dead] = 1
    return hessian, dead


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + lambda I)^-1, lambda = dampening * mean(diag H), in H's dtype.

    Row i of U is the OBS update of the columns > i when column i is fixed, given columns < i are
    already fixed: the whole sequential solve in one Cholesky factor (docs/methods/weight-pruning.md §10.2).

    Computed without forming the inverse: with J the reversal, J chol(J H J) J = M is upper and H = M M^T,
    so U = M^-1 (upper, positive diagonal: the unique factor). One Cholesky and one triangular inverse
    instead of Cholesky, inverse and a second Cholesky: 1.7x less time at K = 2048. Memory beside H: one
    K x K matrix, factored and inverted in place, and the Cholesky's own copy (256 MiB each at K = 8192,
    a 3B model's down_proj, in fp32).
    """
    m = hessian.flip(0, 1)  # a copy, damped in place (its diagonal is H's, reversed)
    m.diagonal().add_(dampening * hessian.diagonal().mean())
    torch.linalg.cholesky(m, out=m)
    m = m.flip(0, 1)  # a copy: the lower factor is freed here, before the inversion
    return invert_upper_(m)


def invert_upper_(upper: torch.Tensor, columns: int = 1024) -> torch.Tensor:
    """The inverse of an upper-triangular matrix, in place, ``columns`` at a time (blocked triangular
    inversion): with U = [[A, B], [0, D]], U^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]], and A^-1 is already
    in place when the walk reaches B. A^-1 B is summed over row blocks of A^-1 from their diagonal
    on (the zeros below it are skipped), so the temporaries are panels, never a K x K identity or
    solve result. Equal to one solve against the identity within 1e-14 (fp64)."""
    k = upper.shape[0]
    for start in range(0, k, columns):
        end = min(start + columns, k)
        eye = torch.eye(end - start, dtype=upper.dtype, device=upper.device)
        d_inv = torch.linalg.solve_triangular(upper[start:end, start:end], eye, upper=True)
        if start:
            ab = torch.empty(start, end - start, dtype=upper.dtype, device=upper.device)
            for r in range(0, start, columns):
                ab[r:r + columns] = upper[r:r + columns, r:start] @ upper[r:start, start:end]
            upper[:start, start:end] = (ab @ d_inv).neg_()
        upper[start:end, start:end] = d_inv
    return upper


def fp32_factor(hessian: torch.Tensor, dampening: float, name: str = "layer") -> torch.Tensor:
    """The factor in fp32 for the column loop (the references' precision; H comes in fp32 from
    `Stats.hessian`), entries below fp32's normal range set to 0: far from the diagonal they decay
    into denormals, which make every CPU update 5x slower.

    A damped H without a Cholesky factor is an error naming ``name``: falling back to an identity
    would silently turn the method into its uncompensated baseline (magnitude pruning, rounding)."""
    try:
        u = inverse_hessian_factor(hessian.float(), dampening)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"{name}: the damped Hessian is not positive definite ({e}); "
                         f"raise 'dampening' (now {dampening})") from e
    tiny = torch.finfo(torch.float32).tiny
    return u.masked_fill_((u < tiny) & (u > -tiny), 0)  # in place: no K x K |u| and copy
