"""The recipe's ``evaluation`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from calibration.spec import DataSpec
from core.spec import Section


class LatencySpec(Section):
    threads: int = Field(default=2, ge=1, le=256)
    warmup: int = Field(default=3, ge=0, le=1000)
    iterations: int = Field(default=20, ge=1, le=100_000)


class GenerationSpec(Section):
    """Decoder runs (``export.decoder``): greedy generation from the first ``prompts`` held-out windows
    (each ``export.seq_len`` tokens), timed in ONNX Runtime against the dense graphs exported the same
    way, and compared token by token with transformers' ``generate`` on the compressed model."""

    prompts: int = Field(default=4, ge=1, le=1000)
    new_tokens: int = Field(default=32, ge=1, le=32_768)  # at most what the cache leaves after the prompt


class AcceptSpec(Section):
    """The quality gate (``evaluation.accept``): bounds on the evaluate stage's comparison with dense.
    Each field is valid only for tasks that have its metric (tasks/: ``accept_metrics``)."""

    max_perplexity_ratio: float | None = Field(default=None, ge=1, le=1000)  # causal-lm
    min_token_agreement: float | None = Field(default=None, ge=0, le=1)  # causal-lm: top-1 next token kept
    min_mean_cosine: float | None = Field(default=None, ge=-1, le=1)  # embedding tasks
    min_min_cosine: float | None = Field(default=None, ge=-1, le=1)  # embedding tasks: the worst sample
    min_top1_retained: float | None = Field(default=None, ge=0, le=1)  # image-classification: top-1 agreement
    min_answer_match: float | None = Field(default=None, ge=0, le=1)  # image-text-to-text: first answer token kept

    @model_validator(mode="after")
    def _not_empty(self):
        if not self.model_dump(exclude_none=True):
            raise ValueError("set at least one bound, e.g. min_mean_cosine: 0.97 or max_perplexity_ratio: 1.15")
        return self


class EvaluationSpec(DataSpec):
    """Held-out data and settings; shapes come from ``export`` so the artifact itself is measured."""

    num_samples: int = Field(default=32, ge=1, le=100_000)
    lee: bool = True
    latency: LatencySpec = LatencySpec()
    generation: GenerationSpec = GenerationSpec()
    accept: AcceptSpec | None = None  # without it the run still ends with a verdict line, without pass/fail
    # ONNX Runtime execution provider for quality and latency (export/onnx.py RUNTIMES); cuda/tensorrt need the gpu extra
    runtime: Literal["cpu", "cuda", "tensorrt"] = "cpu"
