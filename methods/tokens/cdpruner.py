"""CDPruner (arXiv 2506.10967): instruction-conditioned diversity, greedy MAP inference of a DPP, K unrolled steps.

Follows docs/methods/token-pruning.md §11. Similarity S = cosine of the patch features at ``layer``
(the reference uses the projector's output, §11.1); relevance r = cosine of each patch in CLIP's
joint space (post-LN + visual projection, as TRIM) with the prompt's text embedding, times
``relevance_sign`` (paper +1; the released code negates it, -1), min-max normalised per image to
(0, 1]. Kernel L = diag(r)·S·diag(r); `greedy_map` picks K tokens. The text side is TRIM's: the
prompt's embedding is the ``text_embeds`` graph input, the text tower a graph of its own.
Recipe: ``{type: token_prune, method: cdpruner, layer: -2, keep: 64, output: true, prompt: 'a photo of a dog'}``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .base import SELECTORS, Selection
from .prompted import PromptArgs, Prompted
from .select import raster_order

SHIFT = 1e-6  # the reference's offset: the least relevant patch keeps a small positive relevance
EPS = 1e-12  # floor under the pivot's remaining gain: an exhausted kernel (K > its rank) cannot divide by 0


def greedy_map(kernel: torch.Tensor, diag: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] picks, in pick order, of greedy MAP inference on the DPP kernel [B, N, N] with diagonal ``diag`` [B, N].

    Chen et al.'s incremental Cholesky update (NeurIPS 2018), as the reference: d holds each item's
    remaining log-det gain; pick j = argmax d, e = (L[j] − Σ_t c_t[j]·c_t) / √d[j], d ← d − e²,
    d[j] ← −∞. Every step is ArgMax, GatherElements, MatMul and Where: unrolled, static shapes.
    """
    n = kernel.shape[-1]
    positions = torch.arange(n, device=kernel.device)
    d, rows, picks = diag, [], []
    for step in range(k):
        j = d.argmax(dim=-1, keepdim=True)  # [B, 1]
        picks.append(j)
        if step == k - 1:
            break
        e = kernel.gather(1, j.unsqueeze(-1).expand(-1, 1, n))  # [B, 1, N]: row j
        if rows:
            c = torch.cat(rows, dim=1)  # [B, t, N]
            e = e - torch.matmul(c.gather(2, j.unsqueeze(1).expand(-1, len(rows), 1)).transpose(1, 2), c)
        e = e / d.gather(1, j).clamp_min(EPS).sqrt().unsqueeze(-1)
        rows.append(e)
        d = torch.where(positions == j, float("-inf"), d - e.squeeze(1) ** 2)
    return torch.cat(picks, dim=-1)


@SELECTORS.register
class CDPruner(Prompted):
    name = "cdpruner"
    sign_field = "relevance_sign"

    class Args(PromptArgs):
        method: Literal["cdpruner"]
        relevance_sign: Literal["paper", "released_code"] = "paper"  # favour most (paper) or least relevant

    def relevance(self, patches: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """[B, N] in (0, 1]: signed cosine of each projected patch with the text, min-max normalised per image."""
        projected = F.normalize(self.projection(self.norm(patches)).float(), dim=-1)
        text = F.normalize(text_embeds.float(), dim=-1)
        r = self.sign * torch.matmul(projected, text.unsqueeze(-1)).squeeze(-1)
        lo, hi = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
        return (r - lo + SHIFT) / (hi - lo).clamp_min(EPS)

    def select(self, tap):
        x = F.normalize(tap.patches.float(), dim=-1)
        r = self.relevance(tap.patches, tap.inputs["text_embeds"])
        kernel = r.unsqueeze(-1) * torch.matmul(x, x.transpose(1, 2)) * r.unsqueeze(1)
        diag = r * r * (x * x).sum(dim=-1)
        return Selection(raster_order(greedy_map(kernel, diag, self.k)))
