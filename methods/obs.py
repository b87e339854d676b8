"""Optimal Brain Surgeon pieces shared by the methods that fix a Linear's columns one at a time and
push each column's error onto the columns not fixed yet: SparseGPT (zeroing, arXiv 2301.00774) and
GPTQ (rounding, arXiv 2210.17323). Both read the layer-wise Hessian ``H = 2 X^T X / tokens`` of
the calibration inputs (calibration/collectors.py, kind ``hessian``) and walk the columns with one
upper Cholesky factor of its damped inverse (docs/methods/weight-pruning.md §10.2).
"""

from __future__ import annotations

import torch

from core.memory import row_slices


def usable_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H with the inputs the calibration data never excited (diag 0) set to 1 in place, so it inverts,
    and those inputs (their weights are zeroed: nothing measured says what they do)."""
    if hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    return hessian, dead


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + lambda I)^-1, lambda = dampening * mean(diag H), in H's dtype,
    computed in H's memory: H (contiguous) is consumed.

    Row i of U is the OBS update of the columns > i when column i is fixed, given columns < i are
    already fixed: the whole sequential solve in one Cholesky factor (docs/methods/weight-pruning.md §10.2).

    Computed without forming the inverse: with J the reversal, J chol(J H J) J = M is upper and H = M M^T,
    so U = M^-1 (upper, positive diagonal: the unique factor). One Cholesky and one triangular inverse
    instead of Cholesky, inverse and a second Cholesky: 1.7x less time at K = 2048. No K x K matrix
    beside H (256 MiB at K = 8192, a 3B model's down_proj, in fp32): H is reversed, damped, factored,
    reversed and inverted in place, and U comes back as a transposed view of it. The Cholesky writes into
    a column-major view: LAPACK's own layout, so torch makes no copy (it does for a row-major one).
    """
    m = _reverse_(hessian)
    m.diagonal().add_(dampening * m.diagonal().mean())  # the reversed diagonal: the same mean
    torch.linalg.cholesky(m.mT, out=m.mT)  # m.mT = L, lower, with L L^T = J H J (symmetric: m.mT is m)
    return invert_upper_(_reverse_(m).mT)  # (J L^T J)^T = J L J = M


def _reverse_(t: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """J t J in place: rows and columns reversed is the flat buffer reversed, swapped ``chunk`` values
    at a time from both ends (torch's flip is a copy)."""
    flat, n = t.view(-1), t.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        head = flat[a:b].flip(0)
        flat[a:b] = flat[n - b:n - a].flip(0)
        flat[n - b:n - a] = head
    return t


def invert_upper_(upper: torch.Tensor, columns: int = 1024) -> torch.Tensor:
    """The inverse of an upper-triangular matrix, in place, ``columns`` at a time (blocked triangular
    inversion): with U = [[A, B], [0, D]], U^-1 = [[A^-1, -A^-1 B D^-1], [0, D^-1]], and A^-1 is already
    in place when the walk reaches B. A^-1 B is summed over row blocks of A^-1 from their diagonal
    on (the zeros below it are skipped) and written over B as it goes (a row block reads only the rows
    of B from its own on), so the temporaries are ``columns`` x ``columns`` panels, never a K x K
    identity, solve result or column of blocks. Equal to one solve against the identity within 1e-14 (fp64)."""
    k = upper.shape[0]
    for start in range(0, k, columns):
        end = min(start + columns, k)
        eye = torch.eye(end - start, dtype=upper.dtype, device=upper.device)
        d_inv = torch.linalg.solve_triangular(upper[start:end, start:end], eye, upper=True)
        for r in range(0, start, columns):
            upper[r:r + columns, start:end] = upper[r:r + columns, r:start] @ upper[r:start, start:end]
        for r in range(0, start, columns):
            upper[r:r + columns, start:end] = (upper[r:r + columns, start:end] @ d_inv).neg_()
        upper[start:end, start:end] = d_inv
    return upper


def fp32_factor(hessian: torch.Tensor, dampening: float, name: str = "layer") -> torch.Tensor:
    """The factor in fp32 for the column loop (the references' precision; H comes in fp32 from
    `Stats.hessian` and is consumed), entries below fp32's normal range set to 0: far from the diagonal they decay
    into denormals, which make every CPU update 5x slower.

    A damped H without a Cholesky factor is an error naming ``name``: falling back to an identity
    would silently turn the method into its uncompensated baseline (magnitude pruning, rounding)."""
    try:
        u = inverse_hessian_factor(hessian.float(), dampening)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"{name}: the damped Hessian is not positive definite ({e}); "
                         f"raise 'dampening' (now {dampening})") from e
    tiny = torch.finfo(torch.float32).tiny
    for rows in row_slices(u, 2**22):  # in place, by slices: no K x K masks (three were 192 MiB at K = 8192)
        u[rows].masked_fill_((u[rows] < tiny) & (u[rows] > -tiny), 0)
    return u
