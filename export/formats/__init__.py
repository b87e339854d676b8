"""Precision formats of the quantize stage, one module each (base.py: the contract)."""

from core.registry import import_members

from .base import FORMATS, Format, FormatArgs, FormatContext, LayerArgs, Rewritten

import_members(__name__)

__all__ = ["FORMATS", "Format", "FormatArgs", "FormatContext", "LayerArgs", "Rewritten"]
