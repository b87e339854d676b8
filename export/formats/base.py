"""The precision-format family: what every format declares, and the one rewrite it implements.

TensorRT takes precision from the graph in strongly typed builds (docs/methods/quantization.md §1),
so a format is a rewrite of the exported float graph. Each member is one module of this package:
a class registered in `FORMATS` with ``name``, an ``Args`` model whose ``format`` field is
``Literal[name]`` (the quantize stage's recipe arguments, core/registry.py `stage_args`), and
``apply``. The quantize stage does the rest for every member: it picks the targeted Linears
(``targets``/``ignore``, for Args derived from `LayerArgs`), maps them to ONNX nodes, refuses a
target whose TensorRT parser is below ``opset``, feeds calibration samples when ``calibration``
is set, and passes the result through the one gate (export/gate.py) at ``tolerance``. Formats
that store integer weights use the scales a weight-tuning stage (gptq) chose where
``FormatContext.scales`` has them (checked by ``on_grid``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from core.errors import StageFailed
from core.events import Events
from core.registry import Registry

FORMATS: Registry = Registry("precision format", key="format")


class FormatArgs(BaseModel):
    """Recipe fields every format takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rtol: float | None = Field(default=None, gt=0, le=10)  # parity with the float model; None: the format's default


class LayerArgs(FormatArgs):
    """Recipe fields of formats that rewrite chosen block Linears (by torch name, core/targets.py)."""

    targets: list[str] = ["re:.*"]
    ignore: list[str] = []


@dataclass
class FormatContext:
    """What a rewrite may read and write besides the graph."""

    source: Path  # the float graph on disk (ONNX Runtime's calibrator and quantizer read files)
    folder: Path  # the stage folder: files that stay with the run
    work: Path  # scratch, removed when the stage ends
    events: Events  # progress and log lines
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)  # feeds at the export shapes, if asked for
    # node name -> [N, groups] weight scales a stage before export chose (gptq): the weights already lie on
    # that grid, so the format stores them with exactly these scales instead of computing its own
    scales: dict[str, np.ndarray] = field(default_factory=dict)


def on_grid(w: np.ndarray, scale: np.ndarray, low: int, high: int, what: str) -> np.ndarray:
    """The integers ``w / scale`` (broadcast) of weights a stage put on this grid before export. A
    ratio further than 1e-3 from an integer in [low, high] means the weights moved after that stage
    (or the scales belong to another grid): StageFailed, never a silent re-rounding."""
    if (scale <= 0).any():
        raise StageFailed(f"{what}: the given weight scales are not all positive")
    ratio = w / scale
    q = np.rint(ratio)
    off = float(np.abs(ratio - q).max(initial=0))
    if off > 1e-3 or q.min(initial=0) < low or q.max(initial=0) > high:
        raise StageFailed(f"{what}: the weights are not on the grid of the scales the gptq stage chose (w / scale "
                          f"is {off:.3g} from an integer, range [{q.min(initial=0):g}, {q.max(initial=0):g}] of "
                          f"[{low}, {high}]); a stage changed them after gptq")
    return q


@dataclass
class Rewritten:
    model: onnx.ModelProto
    details: dict  # what the manifest records under onnx.quantization, besides format/layers/kept_float


class Format(ABC):
    """One precision format. Subclasses set the class attributes below, ``Args``, and ``apply``."""

    name: ClassVar[str]
    Args: ClassVar[type[FormatArgs]]
    default_rtol: ClassVar[float]  # max |error| / max |reference| against the float PyTorch model, worst output
    calibration: ClassVar[bool] = False  # feed calibration samples (the recipe then needs a calibrate stage)
    # ONNX Runtime graph optimizers that would undo the precision when the evaluation measures the graph
    ort_disabled_optimizers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: FormatArgs):
        self.args = args

    @property
    def tolerance(self) -> float:
        return self.args.rtol or self.default_rtol

    @property
    def opset(self) -> int:
        """The lowest ONNX opset the rewritten graph needs (0: whatever export wrote)."""
        return 0

    def describe(self) -> str:
        """One line for the plan and the report."""
        return self.name

    def check_layers(self, widths: dict[str, int], field: str) -> None:
        """Plan-time checks against the targeted Linears (torch name -> input width); raise RecipeError."""

    def width_divisor(self) -> tuple[int, str, str] | None:
        """What every targeted input width must be a multiple of, as the widths earlier stages can leave
        are checked (stages/base.py check_widths_left): (the number, the argument that sets it, the other
        way out a message offers); None when any width will do."""
        return None

    @abstractmethod
    def apply(self, model: onnx.ModelProto, nodes: dict[str, str], context: FormatContext) -> Rewritten:
        """Rewrite ``model`` (the exported float graph); ``nodes`` maps each targeted torch Linear to
        its MatMul/Gemm node (empty for formats without `LayerArgs`)."""
