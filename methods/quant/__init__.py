"""Quantization math that changes weights before export (docs/methods/quantization.md)."""
