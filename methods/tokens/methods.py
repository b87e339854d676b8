"""One class per token-selection method (docs/methods/token-pruning.md §4-§9), each a static-K selector.

A method sees a `Tap`: the input and output of the block after which tokens are pruned. Attention
scores are recomputed from that block's pre-attention LayerNorm and its q/k projections (a side
branch, token-pruning.md §2), so the main attention is exported untouched and stays fusable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters import Block

from .select import raster_order, top_k_raster


def attention_probs(model: nn.Module, block: Block, x: torch.Tensor, cls_only: bool) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of ``block`` for its input ``x`` [B, T, D], in fp32: [B, H, Q, T].

    ``cls_only`` projects only the first query ([CLS]): O(T·d) instead of O(T²·d).
    """
    h = model.get_submodule(block.attn_norm)(x)
    b, t, _ = h.shape
    queries = h[:, :1] if cls_only else h
    q = block.q.apply(model, queries).view(b, queries.shape[1], block.num_heads, block.head_dim)
    k = block.k.apply(model, h).view(b, t, block.num_heads, block.head_dim)
    logits = torch.matmul(q.transpose(1, 2).float(), k.permute(0, 2, 3, 1).float()) * block.head_dim ** -0.5
    return torch.softmax(logits, dim=-1)


def cls_attention(model: nn.Module, block: Block, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, N]: [CLS] attention to each patch, averaged over heads (softmax over all keys, [CLS] column dropped)."""
    return attention_probs(model, block, x, cls_only=True).mean(dim=1)[:, 0, prefix:]


def global_attention(model: nn.Module, block: Block, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, N]: mean attention each patch receives, over heads and all queries."""
    return attention_probs(model, block, x, cls_only=False).mean(dim=(1, 2))[:, prefix:]


@dataclass
class Tap:
    """What the hook after the pruning block sees."""

    model: nn.Module
    block: Block
    x_in: torch.Tensor  # the block's input [B, T, D]
    x_out: torch.Tensor  # the block's output [B, T, D]
    prefix: int  # leading non-patch tokens ([CLS])
    cols: int  # patch-grid width
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # extra graph inputs (TRIM's text embedding)
    object_score: torch.Tensor | None = None  # HiPrune: global attention at its object layer

    @property
    def patches(self) -> torch.Tensor:
        return self.x_out[:, self.prefix:]


class Method(ABC):
    """Selects ``k`` patch indices [B, k] in raster order; ``weights`` [B, N] weight the fused token (None: plain mean)."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()  # extra graph inputs the method reads
    default_fuse: ClassVar[bool] = False

    def __init__(self, k: int):
        self.k = k

    @abstractmethod
    def select(self, tap: Tap) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(indices [B, k] ascending, fused-token weights [B, N] or None)."""


class ClsAttention(Method):
    """FasterVLM / EViT: the patches [CLS] attends to most (token-pruning.md §5)."""

    name = "cls_attention"

    def select(self, tap):
        score = cls_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        return top_k_raster(score, self.k), score


class GlobalAttention(Method):
    """The patches that receive the most attention from all queries (token-pruning.md §6; encoders without [CLS])."""

    name = "global_attention"

    def select(self, tap):
        score = global_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        return top_k_raster(score, self.k), score


class Trim(Method):
    """TRIM (token-pruning.md §4): patches projected into CLIP's joint space, scored against the text embedding.

    ``sign`` +1 keeps the patches most similar to the text (the paper); -1 keeps the least similar
    (the released code). The fused token is TRIM's plain mean of the unselected patches.
    """

    name = "trim"
    inputs = ("text_embeds",)
    default_fuse = True

    def __init__(self, k: int, sign: float, joint: tuple[nn.Module, nn.Module]):
        super().__init__(k)
        self.sign, self.norm, self.projection = sign, *joint

    def similarity(self, patches: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """[B, N]: raw dot product of each projected patch with the (unnormalised) text embedding."""
        projected = self.projection(self.norm(patches)).float()
        return torch.matmul(projected, text_embeds.float().unsqueeze(-1)).squeeze(-1)

    def select(self, tap):
        prob = torch.softmax(self.sign * self.similarity(tap.patches, tap.inputs["text_embeds"]), dim=-1)
        return top_k_raster(prob, self.k), None


class DivPrune(Method):
    """DivPrune (token-pruning.md §7): greedy max-min cosine diversity, unrolled K steps, in fp32.

    A picked token's running minimum is set to -1 so it can never be picked again (token-pruning.md §7.4's
    robustness rule: 1 - cos(x, x) need not be exactly 0).
    """

    name = "divprune"

    def select(self, tap):
        x = F.normalize(tap.patches.float(), dim=-1)
        dist = 1.0 - torch.matmul(x, x.transpose(1, 2))  # [B, N, N]
        n = dist.shape[-1]
        positions = torch.arange(n, device=dist.device)
        nearest_other = dist.topk(2, dim=1, largest=False, sorted=True).values[:, 1]  # 2nd-smallest per column
        pick = nearest_other.argmax(dim=-1, keepdim=True)  # [B, 1]: the most isolated token
        picks, m = [pick], None
        for _ in range(self.k - 1):
            row = dist.gather(1, pick.unsqueeze(-1).expand(-1, 1, n)).squeeze(1)
            m = row if m is None else torch.minimum(m, row)
            m = torch.where(positions == pick, -1.0, m)
            pick = m.argmax(dim=-1, keepdim=True)
            picks.append(pick)
        return raster_order(torch.cat(picks, dim=-1)), None


class HiPrune(Method):
    """HiPrune (token-pruning.md §8): anchors from an object layer, their 4-neighbours, then registers from the deep layer.

    ``anchors`` = round(K·α/5); neighbours are idx±1 and idx±W clamped to [0, N-1] with no row-wrap
    handling, as the reference. The union without ``unique``: anchor/buffer tokens get +2 on a deep
    score that is at most 1, so one TopK ranks them first, then the best remaining tokens.
    """

    name = "hiprune"

    def __init__(self, k: int, anchors: int):
        super().__init__(k)
        self.anchors = anchors

    def select(self, tap):
        deep = global_attention(tap.model, tap.block, tap.x_in, tap.prefix)
        score = deep
        if self.anchors:
            n, w = deep.shape[-1], tap.cols
            a = tap.object_score.topk(self.anchors, dim=-1).indices
            neighbours = torch.cat([a, a - 1, a + 1, a - w, a + w], dim=-1).clamp(0, n - 1)
            chosen = (neighbours.unsqueeze(-1) == torch.arange(n, device=a.device)).to(deep.dtype).amax(dim=1)
            score = deep + 2.0 * chosen
        return top_k_raster(score, self.k), deep


METHODS: dict[str, type[Method]] = {m.name: m for m in (ClsAttention, GlobalAttention, Trim, DivPrune, HiPrune)}
