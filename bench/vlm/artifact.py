"""Exact match of exported VLM run folders (vision.onnx + prefill/decode graphs) in ONNX Runtime.

What `python -m pipeline generate RUN --image IMG --prompt Q` does, over the first held-out test
questions, with one set of sessions per run: the answer counts when the greedy tokens before the
end-of-sequence token decode to exactly the expected word. Time to first token is ONNX Runtime's,
prompt in (vision graph included) to first new token out. A selector's own vision-graph inputs are
what generate feeds: the question's text embedding (TRIM), patches drawn per question (random-K).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import data, evaluate


def score(run: Path, questions: int, threads: int) -> dict:
    """Exact match (all and by type) and median time to first token of one exported run."""
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig

    from evaluation.generation import eos_ids
    from evaluation.image_generation import OrtVlm
    from export.artifact import GENERATION, PREPROCESSOR
    from tasks.chat import chat_prompt_ids

    processor = AutoProcessor.from_pretrained(run / PREPROCESSOR)
    eos = eos_ids(GenerationConfig.from_pretrained(run / GENERATION))
    vlm = OrtVlm(run, threads)
    test = data.load("test")
    chosen = np.concatenate(evaluate.held_out(test))[:questions]
    hits: dict[str, list[bool]] = {}
    first, t0 = [], time.perf_counter()
    for q in chosen:
        pixels = processor.image_processor(images=[Image.fromarray(test.images[test.image_rows[q]])],
                                           return_tensors="np")["pixel_values"]
        ids = chat_prompt_ids(processor.tokenizer, test.questions[q], raw=False)
        # the question's text for a prompted selector (TRIM), and random-K's patches seeded by the question's index
        out = vlm.generate(pixels, ids, processor.image_token_id, 4, eos=eos, question=test.questions[q], image=int(q))
        answer = processor.tokenizer.decode([t for t in out.tokens if t not in eos], skip_special_tokens=True).strip()
        hits.setdefault(data.answer_type(test.answers[q]), []).append(answer == test.answers[q])
        first.append(out.first_token_s)
    every = [h for v in hits.values() for h in v]
    return {"questions": len(every), "exact_match": round(float(np.mean(every)), 4),
            "by_type": {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())},
            "image_tokens": int(vlm.vision.get_outputs()[0].shape[1]),
            "median_first_token_ms": round(float(np.median(first)) * 1e3, 1), "threads": threads,
            "seconds": round(time.perf_counter() - t0, 1)}
