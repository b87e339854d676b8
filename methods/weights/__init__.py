"""Weight-pruning criteria (docs/methods/weight-pruning.md): one module per criterion, found by name in
`CRITERIA`; importing the package registers them all, so adding a criterion is one new module."""

from core.registry import import_members

from .base import CRITERIA, Criterion, WeightArgs, matrix_mask, nm_mask, row_mask

import_members(__name__)

__all__ = ["CRITERIA", "Criterion", "WeightArgs", "matrix_mask", "nm_mask", "row_mask"]
