"""DivPrune (arXiv 2503.02175): greedy max-min cosine diversity, unrolled K steps, in fp32.

Follows docs/methods/token-pruning.md §7 (on the encoder features at ``layer``, §7.1's deviation).
A picked token's running minimum is set to -1 so it can never be picked again (§7.4's robustness
rule: 1 - cos(x, x) need not be exactly 0). The fused token is the plain mean of the dropped patches.
Recipe: ``{type: token_prune, method: divprune, layer: -2, keep: 0.098, output: true}``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .base import SELECTORS, Method, Selection, SelectorArgs
from .select import raster_order


@SELECTORS.register
class DivPrune(Method):
    name = "divprune"

    class Args(SelectorArgs):
        method: Literal["divprune"]

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
        return Selection(raster_order(torch.cat(picks, dim=-1)))
