"""The recipe's ``evaluation`` section."""

from __future__ import annotations

from pydantic import Field

from calibration.spec import DataSpec
from core.spec import Section


class LatencySpec(Section):
    threads: int = Field(default=2, ge=1, le=256)
    warmup: int = Field(default=3, ge=0, le=1000)
    iterations: int = Field(default=20, ge=1, le=100_000)


class EvaluationSpec(DataSpec):
    """Held-out data and settings; shapes come from ``export`` so the artifact itself is measured."""

    num_samples: int = Field(default=32, ge=1, le=100_000)
    lee: bool = True
    latency: LatencySpec = LatencySpec()
