"""Structured pruning (docs/methods/structured-pruning.md), split as Torch-Pruning does: channel scores
(one module each, found by name in `SCORES`), the allocation of what each block keeps (units,
structures, floors, alignment) and bias compensation. Slicing is the model adapter's."""

from core.registry import import_members

from .base import SCORES, ChannelScore, StructuredArgs

import_members(__name__)

__all__ = ["SCORES", "ChannelScore", "StructuredArgs"]
