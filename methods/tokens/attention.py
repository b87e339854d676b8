"""Attention scores recomputed in a side branch (docs/methods/token-pruning.md §2, §5, §6).

From the pruning block's pre-attention LayerNorm and its q/k projections, so the main attention is
exported untouched and stays fusable; shared by the attention-based selectors.
"""

from __future__ import annotations

import torch
from torch import nn

from models.adapters import Block


def attention_probs(model: nn.Module, block: Block, x: torch.Tensor, cls_only: bool) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of ``block`` for its input ``x`` [B, T, D], in fp32: [B, H, Q, T].

    ``cls_only`` projects only the first query ([CLS]): O(T·d) instead of O(T²·d).
    """
    h = model.get_submodule(block.attn_norm)(x)
    b = h.shape[0]
    queries = h[:, :1] if cls_only else h
    q = block.q.apply(model, queries).view(b, queries.shape[1], block.num_heads, block.head_dim)
    k = _keys(model, block, h)
    logits = torch.matmul(q.transpose(1, 2).float(), k.permute(0, 2, 3, 1).float()) * block.head_dim ** -0.5
    return torch.softmax(logits, dim=-1)


def cls_attention(model: nn.Module, block: Block, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, N]: [CLS] attention to each patch, averaged over heads (softmax over all keys, [CLS] column dropped)."""
    return attention_probs(model, block, x, cls_only=True).mean(dim=1)[:, 0, prefix:]


def global_attention(model: nn.Module, block: Block, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, N]: mean attention each patch receives, over heads and all queries."""
    return attention_probs(model, block, x, cls_only=False).mean(dim=(1, 2))[:, prefix:]


def mean_keys(model: nn.Module, block: Block, x: torch.Tensor) -> torch.Tensor:
    """[B, T, d_h]: the block's keys for its input ``x``, averaged over heads, in fp32 (VisionZip's merge metric)."""
    return _keys(model, block, model.get_submodule(block.attn_norm)(x)).float().mean(dim=2)


def _keys(model: nn.Module, block: Block, h: torch.Tensor) -> torch.Tensor:
    """[B, T, H, d_h] from the normed input ``h``."""
    return block.k.apply(model, h).view(h.shape[0], h.shape[1], block.num_heads, block.head_dim)
