"""The token-selector family (docs/methods/token-pruning.md §2-§3): registry, shared recipe fields, contract.

A selector is one class in its own module of this package, registered in `SELECTORS` under its
``method`` name (the package imports every module, core/registry.py). Its instances select: K
patch indices in raster order from a `Tap`. Its class attributes and class methods are what the
token_prune stage asks of it, so the stage has no per-method branch: what it needs (calibration
images, CLIP's text tower, extra graph inputs, an earlier block), the checks of its own recipe
fields, an installable `Build` for a K, and, for a selector that fixes K itself, `calibrate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from core.errors import RecipeError
from core.registry import Registry
from models.adapters import Adapter, Block
from models.spec import ModelSpec

from .text import Companion

SELECTORS: Registry[type[Method]] = Registry("token selector", key="method")


class SelectorArgs(BaseModel):
    """Recipe fields every selector has; a selector's ``Args`` adds ``method: Literal[name]`` and its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    calibrates_keep: ClassVar[bool] = False  # keep may be omitted: the selector's `calibrate` fixes K

    keep: int | float | None = Field(default=None, validate_default=True)  # count, or ratio of patches
    fuse: bool = False  # append one token averaging the dropped ones (token-pruning.md §9)

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v):
        if v is None:
            if not cls.calibrates_keep:
                able = ", ".join(n for n, c in SELECTORS.members().items() if c.Args.calibrates_keep)
                raise ValueError("keep is required: a count of patch tokens (e.g. 49) or a ratio in (0, 1] "
                                 f"(only {able} can calibrate it)")
            return v
        return check_keep(v)


def check_keep(v):
    """A keep value: a count >= 1 or a ratio in (0, 1] (the recipe's ``keep``, and each of the stage's ``sweep``)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"keep {v!r} is neither a count of patch tokens (e.g. 49) nor a ratio in (0, 1]")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"keep {v} keeps no token: give a count >= 1 or a ratio in (0, 1]")
    if isinstance(v, float) and not 0 < v <= 1:
        raise ValueError(f"keep {v} is not a ratio in (0, 1]; write a count as an integer (e.g. keep: 49)")
    return v


def block_index(value: int, n: int, field: str) -> int:
    """A recipe's block number (negative counts from the end) as 0..n-1, or a RecipeError naming ``field``."""
    if not -n <= value < n:
        raise RecipeError(f"layer {value} does not exist: the encoder has {n} blocks (0..{n - 1}, or -1..-{n})",
                          field=field)
    return value % n


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


class Selection(NamedTuple):
    """What a selector returns for one batch."""

    index: torch.Tensor  # [B, k] patch indices, ascending (raster order)
    weights: torch.Tensor | None = None  # [B, N] weights of the fused token; None: plain mean of the dropped patches
    tokens: torch.Tensor | None = None  # [B, k, D] the token each index stands for; None: the patch itself (VisionZip
    # merges other patches into some of its tokens)


@dataclass(frozen=True)
class Env:
    """What a selector is built against: the encoder, and what the stage loaded because the selector asked."""

    model: nn.Module
    adapter: Adapter
    batch: int  # export batch size: the example shape of companion graphs
    text: tuple[nn.Module, Any] | None = None  # CLIP's text tower and tokenizer (`Method.text_tower`)
    # CLIP's image side of the joint space (post-LN, visual projection) when the text tower is another
    # checkpoint's (`Method.text_source`); None: the model's own (`Adapter.joint_space`)
    joint: tuple[nn.Module, nn.Module] | None = None


@dataclass(frozen=True)
class Build:
    """A selector ready to install: the method, defaults of its extra graph inputs ([1, ...] each), and
    the graphs exported next to model.onnx."""

    method: Method
    defaults: dict[str, torch.Tensor] = field(default_factory=dict)
    companions: tuple[Companion, ...] = ()


@dataclass(frozen=True)
class Calibration:
    """K fixed on the calibration images, and what the stage reports about it (metrics under the method's name)."""

    keep: int
    metrics: dict
    title: str
    headers: list[str]
    rows: list[list]


class Probe(Protocol):
    """The stage's forward passes over the calibration images, for `Method.calibrate`."""

    patches: int  # N, the encoder's patch tokens

    def unpruned(self, build: Build, capture: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """``build`` (made for K = N) installed where the recipe prunes, without fusing: the unpruned
        encoder. Returns ``capture`` of each batch's patch tokens after the pruning block, concatenated,
        and the task outputs."""

    def outputs(self, build: Build) -> np.ndarray:
        """The task outputs with ``build`` installed as the recipe places it."""


class Method(ABC):
    """Selects ``k`` patch indices [B, k] in raster order, and the tokens that stand for them (`Selection`)."""

    name: ClassVar[str]
    Args: ClassVar[type[SelectorArgs]]
    inputs: ClassVar[tuple[str, ...]] = ()  # extra graph inputs the method reads (`Build.defaults` fills them)
    calibration_images: ClassVar[bool] = False  # a calibrate stage must come first (`calibrate` runs on its images)
    text_tower: ClassVar[bool] = False  # the stage loads CLIP's text tower into `Env.text` (`text_source`)

    def __init__(self, k: int):
        self.k = k

    @abstractmethod
    def select(self, tap: Tap) -> Selection:
        """The k indices ascending, the fused token's weights, and any tokens other than the patches themselves."""

    @classmethod
    def validate(cls, args: SelectorArgs, spec: ModelSpec, model: nn.Module, adapter: Adapter, field: str) -> None:
        """Recipe checks against the model's structure (a meta-device copy) and its checkpoint."""

    @classmethod
    def text_source(cls, args: SelectorArgs) -> str | None:
        """The folder of the full CLIP checkpoint whose text tower and joint space the stage loads
        (`text_tower`); None: the model's own checkpoint."""
        return None

    @classmethod
    def resolve(cls, args: SelectorArgs, layer: int, blocks: int, keep: int | None, field: str) -> int | None:
        """Check the selector's own fields once the pruning block (0-based, of ``blocks``) and K are known
        (None: `calibrate` fixes it); return the earlier block whose attention it reads, if any."""
        return None

    @classmethod
    def build(cls, args: SelectorArgs, k: int, env: Env) -> Build:
        return Build(cls(k))

    @classmethod
    def calibrate(cls, args: SelectorArgs, env: Env, probe: Probe, keep: int | None) -> Calibration | None:
        """Fix K on the calibration images (``keep``: the recipe's count, if given); None: the recipe's K stands."""
        return None
