"""The static-K selection block (docs/methods/token-pruning.md §2), in torch ops that export to TensorRT-safe ONNX.

K is always a Python int, so TopK gets a constant K and every shape is static. Only TopK, ArgMax,
GatherElements, Equal, ReduceMax/ReduceSum, MatMul and elementwise ops are used: no boolean
indexing (NonZero), no ``unique``, no scatter.
"""

from __future__ import annotations

import torch


def top_k_raster(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k highest scores, in ascending (raster) order.

    The second TopK sorts the indices: TopK over ``-index`` as float (exact below 2**24 tokens)
    instead of ``sort``, which TensorRT 8.5 cannot take on integers.
    """
    idx = score.topk(k, dim=-1, largest=True, sorted=True).indices
    return raster_order(idx)


def raster_order(idx: torch.Tensor) -> torch.Tensor:
    return idx.gather(-1, raster_permutation(idx))


def raster_permutation(idx: torch.Tensor) -> torch.Tensor:
    """[B, k]: the positions of ``idx`` that put it in ascending order (to reorder tokens made alongside it)."""
    return (-idx.float()).topk(idx.shape[-1], dim=-1, largest=True, sorted=True).indices


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D] (GatherElements on an expanded index)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def dropped(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[B, N] float: 1 where a token was not selected (Equal against an arange, then ReduceMax)."""
    positions = torch.arange(n, device=idx.device)
    kept = (idx.unsqueeze(-1) == positions).to(torch.float32).amax(dim=1)
    return 1.0 - kept


def fused_token(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, D]: the (weighted) mean of the rows of x [B, N, D] that idx did not select.

    ``weights`` [B, N] are normalised over the dropped rows; None gives the plain mean (TRIM's
    aggregate token). Computed in fp32 with a mask rather than Σ_all − Σ_kept (no cancellation).
    """
    w = dropped(idx, x.shape[1])
    if weights is not None:
        w = w * weights.float()
    total = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.matmul((w / total).unsqueeze(1), x.float())).to(x.dtype)
