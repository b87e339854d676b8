"""FLAP: fluctuation-based adaptive structured pruning (arXiv 2312.11983;
docs/methods/structured-pruning.md §3-§5).

Recipe: ``{type: prune_structured, method: flap, ratio: 0.2, structure: UL-UM}``.
"""

from __future__ import annotations

from typing import Literal

from .base import SCORES, ChannelScore, Structure, StructuredArgs
from .wanda_sp import wanda_channel


@SCORES.register
class FLAP(ChannelScore):
    """Channel metrics ``wifv`` (Var_j ||W_:j||^2, the default), ``ifv`` (Var_j) or ``wifn`` (Wanda-sp's);
    in its reference form: AL-AM structure, bias compensation, squared attention scores."""

    name = "flap"

    class Args(StructuredArgs):
        method: Literal["flap"]
        metric: Literal["wifv", "ifv", "wifn"] = "wifv"
        structure: Structure = "AL-AM"
        bias_compensation: bool = True
        square_attention: bool = True

    @property
    def metric(self):
        return self.args.metric

    def activations(self):
        return {"sq_norm"} if self.args.metric == "wifn" else {"mean_var"}

    def channel(self, weight, stats):
        if self.args.metric == "wifn":
            return wanda_channel(weight, stats)
        if self.args.metric == "ifv":
            return stats.var
        w = weight.float()
        return stats.var * (w * w).sum(0)
