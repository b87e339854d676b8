"""``python -m pipeline generate RUN_OR_DIR --prompt ...``: a decoder run (or its pulled artifact) writes text.

Everything comes from the folder: the prefill and decode graphs, the ONNX Runtime settings the run
recorded, the tokenizer and its chat template under preprocessor/ and the generation config (the
end-of-sequence ids) under generation/. Tokens stream to stdout as they come; time to first token and
decode speed go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from core.errors import RecipeError
from evaluation.generation import Generation, OrtDecoder, eos_ids
from export.artifact import GENERATION, PREPROCESSOR
from export.decoder import DECODE


def prompt_ids(tokenizer, prompt: str, raw: bool) -> list[int]:
    """The prompt through the chat template when the tokenizer has one (and ``raw`` is off)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


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
             err: TextIO | None = None) -> Generation:
    """Stream the generated text to ``out`` (stdout) and the timing line to ``err`` (stderr)."""
    from transformers import AutoTokenizer, GenerationConfig

    out, err = out or sys.stdout, err or sys.stderr
    folder = Path(run_dir)
    needed = [folder / "model.onnx", folder / f"{DECODE}.onnx", folder / PREPROCESSOR, folder / GENERATION]
    if not all(p.exists() for p in needed):
        raise RecipeError(f"'{folder}' is not a decoder run: it needs model.onnx, {DECODE}.onnx, {PREPROCESSOR}/ "
                          f"and {GENERATION}/ (run a causal-lm recipe with export.decoder)", field="RUN_OR_DIR")
    manifest = folder / "manifest.json"
    recorded = (json.loads(manifest.read_text()).get("onnx") or {}) if manifest.is_file() else {}
    disabled = tuple(recorded.get("onnxruntime", {}).get("disabled_optimizers", ()))
    tokenizer = AutoTokenizer.from_pretrained(folder / PREPROCESSOR)
    eos = eos_ids(GenerationConfig.from_pretrained(folder / GENERATION))
    ids = prompt_ids(tokenizer, prompt, raw)
    decoder = OrtDecoder(folder / "model.onnx", threads, disabled)
    result = decoder.generate(ids, max_new_tokens, temperature, eos, seed, _Stream(tokenizer, out))
    out.write("\n")
    out.flush()
    speed = f"{result.tokens_per_s:.1f} tokens/s" if result.tokens_per_s else "no decode step"
    err.write(f"{len(ids)} prompt tokens; first token after {result.first_token_s * 1e3:.0f} ms; "
              f"{len(result.tokens)} new tokens, {speed}\n")
    return result
