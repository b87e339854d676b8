"""Static-K token pruning for vision encoders: the selectors (one module each, registered in `SELECTORS`),
their insertion by hooks (pruner.py), and the selection ops that export to TensorRT-safe ONNX (select.py)."""

from core.registry import import_members

from .base import SELECTORS

import_members(__name__)

__all__ = ["SELECTORS"]
