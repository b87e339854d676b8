"""The symmetric integer grids the weight-only formats store, in PyTorch: one definition for every
method that tunes weights for them (AWQ's search, GPTQ's rounding).

export/formats holds the same grids in numpy, applied to the ONNX initializers (int4.py
``int4_blocks``, int8.py ``int8_per_channel``); the tests compare the two bit for bit, so what a
method rounds to is exactly what the deployed graph stores:

- int4 (``bits=4``, groups of ``group_size`` along K): scale = max|w| / 7 per output row and group,
  q = clip(round(w / scale), -8, 7). The last group is shorter when ``group_size`` does not divide K.
- int8 per output channel (``bits=8``, ``group_size=None``): scale = max|w| / 127 per row,
  q = clip(round(w / scale), -127, 127).

An all-zero group or row (pruned) gets scale 1: any scale keeps zeros, and TensorRT needs them positive.
Scales and products are float32, as the formats compute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = {4: (-8, 7), 8: (-127, 127)}  # int8 leaves -128 out: symmetric, as TensorRT's weights


@dataclass(frozen=True)
class Grid:
    bits: int  # 4 or 8
    group_size: int | None  # along K; None: one scale per output row

    def __post_init__(self):
        if self.bits not in LEVELS:
            raise ValueError(f"bits {self.bits}: the formats store {' or '.join(map(str, LEVELS))}")

    @property
    def levels(self) -> tuple[int, int]:
        return LEVELS[self.bits]

    def width(self, k: int) -> int:
        """Columns per group for a K-wide weight."""
        return self.group_size or k

    def groups(self, k: int) -> int:
        return -(-k // self.width(k))

    def scales(self, w: torch.Tensor) -> torch.Tensor:
        """max|w| / top level per row and group of ``w`` [N, K]: [N, groups] float32."""
        n, k = w.shape
        g, blocks = self.width(k), self.groups(k)
        padded = w.new_zeros(n, blocks * g, dtype=torch.float32)
        padded[:, :k] = w
        scale = padded.view(n, blocks, g).abs().amax(-1) / float(self.levels[1])
        scale[scale == 0] = 1.0
        return scale

    def per_column(self, scales: torch.Tensor, k: int) -> torch.Tensor:
        """[N, groups] scales spread to the K columns they cover: [N, K]."""
        return scales.repeat_interleave(self.width(k), dim=1)[:, :k]

    def round(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``w`` on the grid of ``scale`` (broadcast): clip(round(w / scale)) * scale, float32."""
        low, high = self.levels
        return torch.clamp(torch.round(w.float() / scale), low, high) * scale

    def nearest(self, w: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest of ``w`` [N, K] with its own scales: what the format stores when no
        method chose the scales."""
        return self.round(w, self.per_column(self.scales(w), w.shape[1]))
