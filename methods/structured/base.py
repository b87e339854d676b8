"""What every structured-pruning score shares: the common arguments and the `ChannelScore` contract.

A score rates every input channel of a block's two output projections (the attention output
projection: head channels; the MLP output projection: intermediate channels); methods/structured/
allocation.py turns the ratings into the heads and channels each block keeps
(docs/methods/structured-pruning.md §1, §4, §7, §8).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibration.collectors import Stats
from core.registry import Registry

SCORES: Registry = Registry("structured score", key="method")

ALIGNS = (1, 8, 16, 32, 64, 128, 256)
Structure = Literal["AL-AM", "UL-UM", "UL-MM", "AL-MM"]


class StructuredArgs(BaseModel):
    """The arguments of every score. ``structure``, ``bias_compensation`` and ``square_attention``
    have no default here: each score's ``Args`` sets its own (FLAP's reference form or the baselines')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str  # each score narrows it to Literal[name]; declared here so recipes list it first
    ratio: float = Field(gt=0, lt=1)
    structure: Structure
    remove_heads: int | None = Field(default=None, ge=0)
    bias_compensation: bool
    square_attention: bool
    min_heads: int = Field(default=1, ge=1)
    min_channels: int | None = Field(default=None, ge=1)
    align: int = 64
    gqa: Literal["group", "per-group"] = "group"
    modules: Literal["attention+mlp", "attention", "mlp"] = "attention+mlp"
    targets: list[str] = ["re:.*"]
    ignore: list[str] = []
    plain_checkpoint: bool = False  # fail the recipe unless the result is an ordinary transformers checkpoint

    @model_validator(mode="after")
    def _check(self):
        if self.align not in ALIGNS:
            raise ValueError(f"align {self.align} is not allowed: use one of {', '.join(map(str, ALIGNS))}")
        if self.remove_heads is not None and self.structure not in ("UL-MM", "AL-MM"):
            raise ValueError("'remove_heads' only applies to structures UL-MM and AL-MM")
        return self

    @property
    def adaptive(self) -> bool:
        """AL structures compare standardised scores across layers (§4.3, §4.4)."""
        return self.structure.startswith("AL")

    @property
    def attention(self) -> bool:
        return self.modules in ("attention+mlp", "attention")

    @property
    def mlp(self) -> bool:
        return self.modules in ("attention+mlp", "mlp")


class ChannelScore(ABC):
    """One score per input channel of an output projection, and the data it reads.

    ``sequential``: under per-layer (UL) structures the statistics come from the model pruned so
    far, block by block (Wanda's protocol); otherwise from the calibrate stage's dense pass.
    """

    name: ClassVar[str]
    Args: ClassVar[type[StructuredArgs]]
    sequential: ClassVar[bool] = False

    def __init__(self, args: StructuredArgs):
        self.args = args

    @property
    def metric(self) -> str | None:
        """The named channel metric, where the method has a choice (FLAP's ``metric``)."""
        return None

    @abstractmethod
    def activations(self) -> set[str]:
        """Input-statistic kinds the channel score reads (calibration/collectors.py)."""

    @abstractmethod
    def channel(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """[in]: the score of each input column of ``weight`` [out, in]; the lowest are removed."""

    def kinds(self) -> set[str]:
        """Everything the stage must collect: the score's statistics, and the means bias compensation needs."""
        return self.activations() | ({"mean_var"} if self.args.bias_compensation else set())

    def calibrates_sequentially(self) -> bool:
        return self.sequential and not self.args.adaptive

    def attention(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        """Scores of the attention output projection's input channels; FLAP's code squares them (§3)."""
        a = self.channel(weight, stats)
        return a * a if self.args.square_attention else a

    def mlp(self, weight: torch.Tensor, stats: Stats | None) -> torch.Tensor:
        return self.channel(weight, stats)
