"""Answering a question about an image from a VLM run's three graphs in ONNX Runtime.

The vision graph turns the image into its K image tokens; the prompt is K placeholders then the
question's ids, and `OrtDecoder`'s loop runs the prefill graph (which splices the image tokens in
at the placeholders) and the decode graph. The whole prompt must fit one prefill window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from core.errors import RecipeError
from export import onnx as onnx_export
from tasks.image_decoder import IMAGE_EMBEDS, VISION

from .generation import Generation, OrtDecoder


class _ImagePrefill(OrtDecoder):
    """The decoder pair, the prefill graph fed the image tokens as its last input."""

    def __init__(self, prefill: Path, threads: int | None, disabled_optimizers: tuple[str, ...]):
        super().__init__(prefill, threads, disabled_optimizers)
        self.names, self.empty = self.names[:-1], self.empty[:-1]  # image_embeds is not a cache tensor
        self.images: np.ndarray | None = None

    def _run(self, session, ids: np.ndarray, start: int, cache: list) -> list:
        pos = np.arange(start, start + ids.shape[1], dtype=np.int64)
        feeds = dict(zip(self.names, [ids, pos[None], pos, *cache]))
        if session is self.prefill:
            feeds[IMAGE_EMBEDS] = self.images
        return session.run(None, feeds)


class OrtVlm:
    """vision.onnx, model.onnx and decode.onnx of one folder."""

    def __init__(self, folder: Path, threads: int | None = None, disabled_optimizers: tuple[str, ...] = ()):
        self.vision = onnx_export.session(folder / f"{VISION}.onnx", threads, disabled_optimizers)
        self.decoder = _ImagePrefill(folder / "model.onnx", threads, disabled_optimizers)

    def prompt(self, images: np.ndarray, text_ids: list[int], image_id: int) -> list[int]:
        """K placeholders, then the question; one line when it does not fit the prefill window."""
        ids = [image_id] * images.shape[1] + list(text_ids)
        if len(ids) > self.decoder.prompt_len:
            raise RecipeError(f"the prompt is {len(ids)} tokens ({images.shape[1]} image tokens and the question); "
                              f"the prefill graph reads {self.decoder.prompt_len}: shorten the question or export "
                              "with a longer seq_len", field="--prompt")
        return ids

    def generate(self, pixel_values: np.ndarray, text_ids: list[int], image_id: int, max_new_tokens: int,
                 temperature: float = 0.0, eos: Iterable[int] = (), seed: int = 0,
                 on_token: Callable[[int], None] | None = None) -> Generation:
        images = self.vision.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]
        ids = self.prompt(images, text_ids, image_id)
        self.decoder.images = images
        return self.decoder.generate(ids, max_new_tokens, temperature, eos, seed, on_token)
