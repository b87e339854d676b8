"""The recipe's ``export`` section: static shapes, parity tolerance and the TensorRT target."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.spec import Section

from .trt_targets import TARGETS


class TensorRTSpec(Section):
    """The TensorRT target the exported graph is checked against and prepared for (``build/``)."""

    target: Literal[tuple(TARGETS)] = "jetson-orin-jp6"
    workspace_mib: int = Field(default=1024, ge=16, le=1 << 20)
    optimization_level: int = Field(default=3, ge=0, le=5)
    atol: float = Field(default=1e-3, gt=0, le=1)  # engine vs ONNX Runtime (TF32 math in FP32 builds)
    rtol: float = Field(default=1e-2, gt=0, le=1)


class DecoderSpec(Section):
    """Causal LMs only: export as a prefill graph (``model.onnx``, ``seq_len`` tokens) and a decode graph
    (``decode.onnx``, one token) over a static KV cache of ``max_len`` slots per layer, sharing one weight
    file (docs/methods/decoder-export.md)."""

    max_len: int = Field(default=512, ge=3, le=32_768)  # cache slots: the prompt plus every generated token


class ExportSpec(Section):
    """Static shapes of the exported graph (no dynamic axis anywhere)."""

    batch_size: int = Field(default=1, ge=1, le=4096)
    seq_len: int = Field(default=128, ge=2, le=32_768)
    image_size: int | None = Field(default=None, ge=8, le=4096)
    opset: int = Field(default=18, ge=18, le=20)
    rtol: float = Field(default=1e-4, gt=0, le=1)
    parity_batches: int = Field(default=2, ge=1, le=64)
    tensorrt: TensorRTSpec = TensorRTSpec()
    decoder: DecoderSpec | None = None

    @model_validator(mode="after")
    def _decoder_fits(self):
        if self.decoder is not None and self.decoder.max_len <= self.seq_len:
            raise ValueError(f"decoder.max_len ({self.decoder.max_len}) must exceed seq_len ({self.seq_len}), the "
                             "prefill length: the cache holds the prompt and the generated tokens")
        if self.decoder is not None and self.batch_size != 1:
            raise ValueError("decoder graphs generate one sequence: set batch_size to 1")
        return self
