"""GPTQ: rounding a Linear's weights to the deployed integer grid with error compensation
(Frantar et al., arXiv 2210.17323; docs/methods/recovery.md, "GPTQ").

Round-to-nearest treats every weight alone. GPTQ rounds the input columns one at a time and moves
the columns not rounded yet to absorb each column's rounding error, in the proportions that keep
the layer's output on the calibration inputs closest (Optimal Brain Surgeon with a fixed order).
The Hessian, its damping and the upper Cholesky factor ``U`` of its inverse are SparseGPT's
(methods/obs.py); row ``j`` of ``U`` is the update of the later columns when column ``j`` is fixed.
Columns are walked in blocks of ``blocksize`` whose errors reach the columns to their right in one
matrix product (the same result as column by column).

The grid is methods/quant/grid.py's, the one the int4 and int8/w8a16 formats store; the scales
are returned so the export writes exactly the integers chosen here.

- Scales are fixed up front from the weights as they came in when ``group_size`` is None (one per
  output row) or with ``act_order`` (columns by decreasing ``diag H``; the deployed groups are
  contiguous in the original order, so their scales cannot wait for the loop: "static groups").
  Otherwise a group's scale is taken when the walk reaches its first column, from the weights as
  updated by then (the reference's rule); ``blocksize`` must then be a multiple of ``group_size``
  so a group's columns are all up to date at that moment.
- Weights that are exactly zero on entry (pruned) are rounded to zero, and what earlier columns
  added to them is passed on to later columns like any rounding error: the mask survives, as in
  SparseGPT's joint sparsify-and-quantize loop. Inputs the calibration never excited (diag H = 0)
  are zeroed, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.memory import row_slices

from ..obs import fp32_factor, usable_hessian
from .grid import Grid

_SLICE = 2**20  # weights per slice of rows in output_error
_ROWS = 2**23  # weights per slice of rows GPTQ walks at once (32 MiB in fp32)


@dataclass(frozen=True)
class GptqResult:
    scales: torch.Tensor  # float32 [N, groups]; [N, 1] for one scale per output row
    row_error: torch.Tensor  # float64 [N]: each output row's output_error, from the walk itself


def output_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """1/2 tr((W - Q) H (W - Q)^T) for H = 2 X^T X / tokens (calibration/collectors.py): the mean over
    calibration tokens of the squared output error ||(W - Q) x||^2. In H's precision (fp32: the
    N K^2 product in fp64 took longer than GPTQ itself at K = 8192), summed in fp64."""
    total = 0.0
    for rows in row_slices(weight, _SLICE):  # temporaries of 4 MiB, not five Linear-sized ones
        d = weight[rows].to(hessian.dtype) - new[rows].to(hessian.dtype)
        total += float(((d @ hessian) * d).sum(dtype=torch.float64))
    return 0.5 * total


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
         dampening: float = 0.01, act_order: bool = False, blocksize: int = 128, name: str = "layer") -> GptqResult:
    """``weight`` [N, K] rounded in place to the ``bits`` grid (groups of ``group_size`` along K, or one
    scale per row; each entry q * scale, exact in fp32, rounded once more to a narrower dtype) by GPTQ
    on ``hessian`` [K, K], which is consumed: its memory becomes the inverse factor (256 MiB at a 3B
    model's down_proj, not a second matrix beside it). ``name`` labels errors.

    Rows are independent given the factor, so they are walked _ROWS weights at a time and written
    back as they are done: the fp32 working copies are two slices, not three Linear-sized matrices
    (201 -> 74 MiB beside H at a 3B model's down_proj). Each fixed column raises the damped
    objective 1/2 (W - W0)(H + lambda I)(W - W0)^T by exactly errors^2 / 2 (OBS, summed over the walk),
    so every row's output error comes out of the walk with the damping's share taken off: no N K^2
    product after it."""
    grid = Grid(bits, group_size)
    if not (act_order or group_size is None) and blocksize % group_size:
        raise ValueError(f"blocksize {blocksize} must be a multiple of group_size {group_size} (or set act_order), "
                         "so a group's scale is taken from weights its block has fully updated")
    h, dead = usable_hessian(hessian, weight)
    lam = dampening * float(h.diagonal().mean())
    n, k = weight.shape
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    u = fp32_factor(h[order][:, order] if order is not None else h, dampening, name)
    scales = torch.empty(n, grid.groups(k), dtype=torch.float32, device=weight.device)
    row_error = torch.empty(n, dtype=torch.float64, device=weight.device)
    for rows in row_slices(weight, _ROWS):
        w = weight[rows].to(torch.float32, copy=True)
        w[:, dead] = 0
        new, scales[rows], walked = _walk(w, u, grid, order, blocksize)
        del w  # the rounded rows now (or, with act_order, their reordered copy's source)
        change = weight[rows].to(torch.float32, copy=True).sub_(new).masked_fill_(dead, 0)  # over excited inputs
        row_error[rows] = 0.5 * walked - 0.5 * lam * change.square_().sum(1).double()  # (dtype=fp64 upcasts it whole)
        weight[rows] = new
        del new, change  # before the next slice's copies
    return GptqResult(scales, row_error)


def _walk(w: torch.Tensor, u: torch.Tensor, grid: Grid, order: torch.Tensor | None,
          blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's column walk over rows ``w`` [R, K] (fp32), in ``order`` (act_order) or as they come: their
    rounded weights in the original order, scales, and sum of squared errors. The rounded weights are
    written over ``w`` block by block (a block's columns are never read again once it is walked): w
    itself is returned unless act_order reorders a copy."""
    k = w.shape[1]
    static = order is not None or grid.group_size is None
    scales = grid.scales(w) if static else w.new_zeros(w.shape[0], grid.groups(k))
    walk = order if order is not None else torch.arange(k, device=w.device)
    if order is not None:
        w = w[:, order]
    zero = w == 0  # pruned weights stay zero
    group_of = walk // grid.width(k)  # group (original columns) of each column in walk order
    walked = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for start in range(0, k, blocksize):
        end = min(start + blocksize, k)
        block = w[:, start:end].clone()  # contiguous: the column loop runs on it
        errors, rounded = torch.zeros_like(block), torch.empty_like(block)
        for i, col in enumerate(range(start, end)):
            if not static and col % grid.width(k) == 0:
                first = block[:, i:i + grid.width(k)].masked_fill(zero[:, col:col + grid.width(k)], 0)
                scales[:, group_of[col]] = grid.scales(first)[:, 0]
            rounded[:, i] = grid.round(block[:, i], scales[:, group_of[col]]).masked_fill(zero[:, col], 0)
            errors[:, i] = (block[:, i] - rounded[:, i]) / u[col, col]
            block[:, i:].addr_(errors[:, i], u[col, col:end], alpha=-1)  # later columns compensate
        walked += (errors * errors).sum(1, dtype=torch.float64)
        w[:, end:].addmm_(errors, u[start:end, end:], alpha=-1)  # the block's errors, spread to the columns after it
        w[:, start:end] = rounded
    return (w[:, torch.argsort(order)] if order is not None else w), scales, walked
