"""The contract between the runner and a stage: typed arguments in, metrics and tables out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.context import RunContext


class StageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list]


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)


class Stage(ABC):
    """One step of a recipe. Subclasses set ``type`` and ``Args`` and implement ``run``."""

    type: ClassVar[str]
    Args: ClassVar[type[StageArgs]]
    changes_model: ClassVar[bool] = False
    rewrites_onnx: ClassVar[bool] = False  # edits the exported model.onnx (needs an export before it)

    def __init__(self, args: StageArgs):
        self.args = args

    @classmethod
    def needs_calibration(cls, args) -> Literal[False, "data", "dense-statistics"]:
        """Whether a calibrate stage must come before (and whether its statistics must be current)."""
        return False

    @classmethod
    def statistics(cls, args) -> set[str]:
        """Statistic kinds (and "gradients") the calibrate stage must collect for this stage."""
        return set()

    @classmethod
    def describe(cls, args) -> str:
        return cls.type

    def validate(self, recipe, model, adapter, field: str) -> None:
        """Checks against the model's structure (a meta-device copy) before any work starts."""

    @abstractmethod
    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        """Do the work; write stage files under ``folder``."""

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        """Put back into ``ctx`` what a completed stage left there (for --resume)."""
