"""Fixed-shape, seeded batches: every sample is exactly ``seq_len`` tokens (or one image size).

The primitives a task builds its calibration and evaluation batches from (tasks/ chooses which):
token windows of a stream (no padding, no special tokens), as the Wanda/GBLM protocol samples C4;
whole paragraphs padded to ``seq_len`` with an attention mask that the statistic collectors
honour; and preprocessed images. Evaluation takes the first non-overlapping windows of the
held-out text, so the protocol is reproducible from the manifest alone.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from core.errors import RecipeError

from .sources import ImageData, TextData, paragraphs


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # exactly the model's keyword inputs
    labels: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def token_mask(self) -> torch.Tensor | None:
        """[B, T] bool, True on real tokens; None when every position is real."""
        mask = self.inputs.get("attention_mask")
        return None if mask is None or bool(mask.all()) else mask.bool()


@dataclass
class Batches:
    batches: list[Batch]
    origin: str
    protocol: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def sha256(self) -> str:
        """Digest of the exact model inputs (keys calibration caches)."""
        h = hashlib.sha256()
        for b in self.batches:
            for k in sorted(b.inputs):
                h.update(k.encode())
                h.update(b.inputs[k].contiguous().numpy().tobytes())
        return h.hexdigest()

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _chunk(samples: dict[str, torch.Tensor], batch_size: int, labels: torch.Tensor | None = None,
           drop_last: bool = False) -> list[Batch]:
    n = next(iter(samples.values())).shape[0]
    stop = n - n % batch_size if drop_last else n
    return [Batch({k: v[i:i + batch_size] for k, v in samples.items()},
                  None if labels is None else labels[i:i + batch_size])
            for i in range(0, stop, batch_size)]


def _token_stream(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def random_windows(tokenizer, text: TextData, spec, field: str) -> Batches:
    """``spec.num_samples`` seeded windows of ``spec.seq_len`` tokens anywhere in the stream (``spec``: a
    CalibrationSpec)."""
    rng = random.Random(spec.seed)
    stream = _token_stream(tokenizer, text.text)
    if len(stream) <= spec.seq_len:
        raise RecipeError(f"the text has {len(stream)} tokens, fewer than seq_len={spec.seq_len}",
                          field=f"{field}.path" if spec.path else f"{field}.seq_len")
    starts = [rng.randint(0, len(stream) - spec.seq_len - 1) for _ in range(spec.num_samples)]
    ids = torch.stack([stream[s:s + spec.seq_len] for s in starts])
    return Batches(_chunk({"input_ids": ids}, spec.batch_size), text.origin,
                   {"kind": "random windows", "seed": spec.seed, "windows": len(starts), "seq_len": spec.seq_len,
                    "stream_tokens": len(stream), "special_tokens": False})


def first_windows(tokenizer, text: TextData, num_samples: int, batch_size: int, seq_len: int,
                  field: str) -> Batches:
    """The first non-overlapping windows, whole batches only (at most ``num_samples``)."""
    stream = _token_stream(tokenizer, text.text)
    n = min(num_samples, (len(stream) - 1) // seq_len)
    n -= n % batch_size
    if n < 1:
        raise RecipeError(f"the held-out text has {len(stream)} tokens: not one batch of {batch_size} x "
                          f"{seq_len}-token windows", field=f"{field}.num_samples")
    ids = stream[: n * seq_len].view(n, seq_len)
    return Batches(_chunk({"input_ids": ids}, batch_size, drop_last=True), text.origin,
                   {"kind": "first non-overlapping windows", "windows": n, "seq_len": seq_len, "offset": 0,
                    "stream_tokens": len(stream), "special_tokens": False})


def random_paragraphs(tokenizer, text: TextData, spec, field: str) -> Batches:
    """``spec.num_samples`` seeded paragraphs (8+ words), padded to ``spec.seq_len`` (``spec``: a CalibrationSpec)."""
    paras = paragraphs(text.text)
    if not paras:
        raise RecipeError("the text has no paragraph of 8 words or more", field=f"{field}.path")
    chosen = random.Random(spec.seed).sample(paras, min(spec.num_samples, len(paras)))
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=spec.seq_len, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    return Batches(_chunk(inputs, spec.batch_size), text.origin,
                   {"kind": "random paragraphs", "seed": spec.seed, "paragraphs": len(chosen), "seq_len": spec.seq_len,
                    "padding": "max_length, masked out of statistics"})


def held_out_paragraphs(tokenizer, text: TextData, num_samples: int, seed: int, batch_size: int, seq_len: int,
                        field: str) -> Batches:
    """Seeded paragraphs of 20+ words at the export shapes, whole batches only."""
    paras = paragraphs(text.text, min_words=20)
    chosen = random.Random(seed).sample(paras, min(num_samples, len(paras)))
    chosen = chosen[: len(chosen) - len(chosen) % batch_size]
    if not chosen:
        raise RecipeError(f"fewer than batch_size={batch_size} held-out paragraphs of 20+ words",
                          field=f"{field}.num_samples")
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    return Batches(_chunk(inputs, batch_size, drop_last=True), text.origin,
                   {"kind": "random paragraphs (20+ words)", "seed": seed, "paragraphs": len(chosen),
                    "seq_len": seq_len})


def encode_texts(preprocessor, texts: list[str], batch_size: int, seq_len: int) -> list[Batch]:
    """Texts padded to the static export shape; the last batch is padded with empty strings."""
    pad = (-len(texts)) % batch_size
    enc = preprocessor(texts + [""] * pad, padding="max_length", truncation=True, max_length=seq_len,
                       return_tensors="pt")
    return _chunk({k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}, batch_size)


def random_images(processor, data: ImageData, spec, size: int | None) -> Batches:
    """``spec.num_samples`` seeded images, the last batch possibly short (``spec``: a CalibrationSpec)."""
    idx = random.Random(spec.seed).sample(range(len(data.images)), min(spec.num_samples, len(data.images)))
    return _image_batches(data, idx, processor, spec.batch_size, size, drop_last=False)


def first_images(processor, data: ImageData, num_samples: int, batch_size: int, size: int | None) -> Batches:
    """The first images (at most ``num_samples``), whole batches only."""
    n = min(num_samples, len(data.images))
    return _image_batches(data, list(range(n)), processor, batch_size, size, drop_last=True)


def _image_batches(data: ImageData, idx: list[int], processor, batch_size: int, size: int | None,
                   drop_last: bool) -> Batches:
    if drop_last:
        idx = idx[: len(idx) - len(idx) % batch_size]
        if not idx:
            raise RecipeError(f"fewer images than batch_size={batch_size}", field="evaluation.num_samples")
    kw = {"size": {"height": size, "width": size}} if size else {}
    pixels = processor([data.images[i] for i in idx], return_tensors="pt", **kw)["pixel_values"]
    labels = torch.tensor([data.labels[i] for i in idx]) if data.labels is not None else None
    return Batches(_chunk({"pixel_values": pixels}, batch_size, labels, drop_last), data.origin,
                   {"kind": "images", "images": len(idx), "labelled": labels is not None,
                    "classes": data.classes})
