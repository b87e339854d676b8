"""``python -m pipeline generate RUN_OR_DIR --prompt ...``: a decoder run (or its pulled artifact) writes text.

Everything comes from the folder: the prefill and decode graphs, the ONNX Runtime settings the run
recorded, the tokenizer and its chat template under preprocessor/ and the generation config (the
end-of-sequence ids) under generation/. Tokens stream to stdout as they come; time to first token and
decode speed go to stderr. A VLM whose vision graph reads a token selector's inputs gets them from
the prompt (TRIM's question embedding) or from ``--seed`` and the image's bytes (random-K's patches).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import TextIO

from core.errors import RecipeError
from evaluation.generation import Generation, OrtDecoder, eos_ids
from evaluation.image_generation import OrtVlm
from export.artifact import GENERATION, PREPROCESSOR
from export.decoder import DECODE
from tasks.chat import chat_prompt_ids
from tasks.image_decoder import VISION


class _Stream:
    """Prints the decoded text as tokens arrive, holding back a character still incomplete in UTF-8."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out, self.tokens, self.shown = tokenizer, out, [], ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
             threads: int | None = None, raw: bool = False, out: TextIO | None = None,
             err: TextIO | None = None, image: Path | None = None) -> Generation:
    """Stream the generated text to ``out`` (stdout) and the timing line to ``err`` (stderr); a VLM run
    (vision.onnx beside the decoder graphs) answers ``prompt`` about ``image``."""
    from transformers import AutoProcessor, AutoTokenizer, GenerationConfig

    out, err = out or sys.stdout, err or sys.stderr
    folder = Path(run_dir)
    needed = [folder / "model.onnx", folder / f"{DECODE}.onnx", folder / PREPROCESSOR, folder / GENERATION]
    if not all(p.exists() for p in needed):
        raise RecipeError(f"'{folder}' is not a decoder run: it needs model.onnx, {DECODE}.onnx, {PREPROCESSOR}/ "
                          f"and {GENERATION}/ (run a causal-lm recipe with export.decoder)", field="RUN_OR_DIR")
    manifest = folder / "manifest.json"
    recorded = (json.loads(manifest.read_text()).get("onnx") or {}) if manifest.is_file() else {}
    disabled = tuple(recorded.get("onnxruntime", {}).get("disabled_optimizers", ()))
    vision = (folder / f"{VISION}.onnx").exists()
    if vision != (image is not None):
        raise RecipeError(f"'{folder}' is a VLM run: give --image" if vision else
                          f"'{folder}' has no vision graph ({VISION}.onnx): --image needs an image-text-to-text run",
                          field="--image")
    eos = eos_ids(GenerationConfig.from_pretrained(folder / GENERATION))
    if image is not None:
        processor = AutoProcessor.from_pretrained(folder / PREPROCESSOR)
        tokenizer, ids = processor.tokenizer, chat_prompt_ids(processor.tokenizer, prompt, raw)
        vlm = OrtVlm(folder, threads, disabled)
        result = vlm.generate(_pixels(processor, image), ids, processor.image_token_id, max_new_tokens, temperature,
                              eos, seed, _Stream(tokenizer, out), question=prompt, image=zlib.crc32(image.read_bytes()))
        ids = result.prompt
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder / PREPROCESSOR)
        ids = chat_prompt_ids(tokenizer, prompt, raw)
        decoder = OrtDecoder(folder / "model.onnx", threads, disabled)
        result = decoder.generate(ids, max_new_tokens, temperature, eos, seed, _Stream(tokenizer, out))
    out.write("\n")
    out.flush()
    speed = f"{result.tokens_per_s:.1f} tokens/s" if result.tokens_per_s else "no decode step"
    err.write(f"{len(ids)} prompt tokens; first token after {result.first_token_s * 1e3:.0f} ms; "
              f"{len(result.tokens)} new tokens, {speed}\n")
    return result


def _pixels(processor, image: Path):
    """The image as the shipped image processor prepares it (numpy, no torch)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise RecipeError(f"cannot read image '{image}': {e}", field="--image") from None
    return processor.image_processor(images=[rgb], return_tensors="np")["pixel_values"]
