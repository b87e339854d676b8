"""Answering a question about an image from a VLM run's three graphs in ONNX Runtime.

The vision graph turns the image into its K image tokens; the prompt is K placeholders then the
question's ids, and `OrtDecoder`'s loop runs the prefill graph (which splices the image tokens in
at the placeholders) and the decode graph. The whole prompt must fit one prefill window.

A token selector's own vision-graph inputs are fed here: TRIM's and CDPruner's ``text_embeds`` is
the question's CLIP embedding (text_tokenizer/ and text_encoder.onnx shipped with the run), so the
image tokens are chosen for the question asked; random-K's ``keep_idx`` is the caller's, or a
subset drawn per image from (seed, image id) (methods/tokens/random.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from core.errors import RecipeError
from export import onnx as onnx_export
from export.artifact import TEXT_TOKENIZER
from methods.tokens.random import per_image
from methods.tokens.text import TEXT_FILE
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


class _QuestionText:
    """The question as TRIM's text graph reads it: CLIP token ids at the graph's static shape, embedded."""

    def __init__(self, folder: Path, threads: int | None, disabled_optimizers: tuple[str, ...]):
        from transformers import AutoTokenizer

        self.session = onnx_export.session(folder / TEXT_FILE, threads, disabled_optimizers)
        self.batch, self.length = self.session.get_inputs()[0].shape
        self.tokenizer = AutoTokenizer.from_pretrained(folder / TEXT_TOKENIZER)

    def embed(self, question: str) -> np.ndarray:
        """[1, P]: the question's text embedding (the graph's static batch holds it repeated)."""
        ids = self.tokenizer([question], padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="np")["input_ids"].astype(np.int64)
        return self.session.run(None, {"input_ids": np.repeat(ids, self.batch, axis=0)})[0][:1]


class OrtVlm:
    """vision.onnx, model.onnx and decode.onnx of one folder (and TRIM's text graph when the vision graph reads it)."""

    def __init__(self, folder: Path, threads: int | None = None, disabled_optimizers: tuple[str, ...] = ()):
        self.vision = onnx_export.session(folder / f"{VISION}.onnx", threads, disabled_optimizers)
        self.decoder = _ImagePrefill(folder / "model.onnx", threads, disabled_optimizers)
        self.inputs = {i.name: i.shape for i in self.vision.get_inputs()[1:]}  # the token selector's own
        self.text = _QuestionText(folder, threads, disabled_optimizers) if "text_embeds" in self.inputs else None
        self.patches = _patches(folder)

    def selector_inputs(self, question: str | None, keep_idx: np.ndarray | None, seed: int,
                        image: int) -> dict[str, np.ndarray]:
        """The vision graph's inputs besides the image: the question's embedding, the patches to keep."""
        feeds = {}
        if self.text is not None:
            if question is None:
                raise RecipeError("this run's vision graph picks image tokens for the question: give the question "
                                  "text", field="--prompt")
            feeds["text_embeds"] = self.text.embed(question)
        if "keep_idx" in self.inputs:
            feeds["keep_idx"] = self._keep_idx(keep_idx, seed, image)
        return feeds

    def _keep_idx(self, keep_idx: np.ndarray | None, seed: int, image: int) -> np.ndarray:
        """[1, K]: the caller's indices, or the image's own uniform subset drawn from (seed, image)."""
        k = self.inputs["keep_idx"][1]
        if keep_idx is None:
            if self.patches is None:
                raise RecipeError("the run records no patch count (manifest.json onnx.token_pruning.patches) to "
                                  "draw the image's random patches from: pass keep_idx", field="RUN_OR_DIR")
            keep_idx = per_image(self.patches, k, seed, image)
        return np.asarray(keep_idx, np.int64).reshape(1, k)

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
                 on_token: Callable[[int], None] | None = None, question: str | None = None,
                 keep_idx: np.ndarray | None = None, image: int = 0) -> Generation:
        """Answer ``text_ids`` (the chat-formatted ``question``) about the image. ``seed`` also seeds random-K's
        patches with ``image`` (the image's id, e.g. a checksum of its bytes) unless ``keep_idx`` gives them."""
        feeds = {"pixel_values": pixel_values.astype(np.float32), **self.selector_inputs(question, keep_idx, seed, image)}
        images = self.vision.run(None, feeds)[0]
        ids = self.prompt(images, text_ids, image_id)
        self.decoder.images = images
        return self.decoder.generate(ids, max_new_tokens, temperature, eos, seed, on_token)


def _patches(folder: Path) -> int | None:
    """N, the patch tokens the selector chose from, as the run recorded it (manifest.json), if it did."""
    manifest = folder / "manifest.json"
    recorded = (json.loads(manifest.read_text()).get("onnx") or {}) if manifest.is_file() else {}
    return (recorded.get("token_pruning") or {}).get("patches")
