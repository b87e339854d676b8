"""Exact-match easy-VQA accuracy of the trained VLM by question type, against the answer prior.

The held-out set is 1,000 test questions: 4 drawn (seed 0) from each of 250 drawn test images (of
those with 4 or more questions), so
that packing (llava.py) runs each image's 64 tokens once for its 4 questions. Exact match is scored
teacher-forced: the greedy argmax at every answer position must be the answer's token and then
<eos>, which holds exactly when greedy generation outputs the answer and stops.
"""

from __future__ import annotations

import collections
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data, llava

IMAGES, PER_IMAGE, SEED = 250, 4, 0


def held_out(split: data.Split, images: int = IMAGES, per_image: int = PER_IMAGE, seed: int = SEED) -> list[np.ndarray]:
    """Question indices per drawn test image (``per_image`` each, from images that have that many)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(split.image_rows, minlength=len(split.images))
    rows = rng.choice(np.flatnonzero(counts >= per_image), images, replace=False)
    return [rng.choice(np.flatnonzero(split.image_rows == r), per_image, replace=False) for r in rows]


def prior(train: data.Split) -> dict[str, str]:
    """The most frequent training answer of each question type."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for answer in train.answers:
        counts[data.answer_type(answer)][answer] += 1
    return {kind: c.most_common(1)[0][0] for kind, c in counts.items()}


@torch.no_grad()
def exact_match(lm, adapter, tokenizer, features: torch.Tensor, split: data.Split, picks: list[np.ndarray],
                batch: int = 8) -> np.ndarray:
    """Per question (in ``picks`` order): 1 where greedy decoding gives exactly the answer then <eos>.

    ``features`` [len(picks), K, width]: the image tokens each group of questions reads."""
    correct = []
    for i in tqdm(range(0, len(picks), batch), desc="evaluate", mininterval=10):
        chunk = picks[i:i + batch]
        packed = llava.pack(llava.blocks_for(split, tokenizer, chunk), features.shape[1], tokenizer.eos_token_id)
        hits = llava.answer_logits(lm, adapter, features[i:i + batch], packed).argmax(-1) == packed.labels[packed.labels != -100]
        lengths = [len(llava.answer_ids(tokenizer, split.answers[q])) for p in chunk for q in p]
        correct += [bool(h.all()) for h in torch.split(hits, lengths)]
    return np.array(correct)


def by_type(hits: np.ndarray, kinds: list[str]) -> dict[str, float]:
    out = {k: round(float(hits[[t == k for t in kinds]].mean()), 4) for k in data.TYPES}
    return {"all": round(float(hits.mean()), 4), **out}


def earlier(out: Path, llava_record: dict) -> list[dict]:
    """The accuracies of adapters evaluated into ``out`` before this one (kept, not overwritten)."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    kept = old.get("earlier_adapters", [])
    if old.get("llava") != llava_record:
        kept.append({"llava": {k: v for k, v in old["llava"].items() if k != "continued_from"},
                     "exact_match": old["exact_match"]})
    return kept


def run(out: Path, clip_dir: Path, adapter_dir: Path) -> dict:
    from transformers import CLIPModel

    t0 = time.time()
    lm, tokenizer = llava.load_language_model()
    adapter = llava.load(adapter_dir, lm)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    test, train = data.load("test"), data.load("train")
    picks = held_out(test)
    features = llava.vision_features(clip.vision_model, test.images)
    order = np.concatenate(picks)
    kinds = [data.answer_type(test.answers[q]) for q in order]
    hits = exact_match(lm, adapter, tokenizer, features[torch.from_numpy(test.image_rows[[p[0] for p in picks]])], test,
                       picks)
    guess = prior(train)
    prior_hits = np.array([test.answers[q] == guess[k] for q, k in zip(order, kinds)])
    record = {
        "data": "easy-vqa 1.0 (PyPI): 4,000 train / 1,000 test images, 38,575 / 9,673 questions",
        "held_out": f"{len(order)} test questions: {PER_IMAGE} from each of {IMAGES} test images drawn with seed {SEED}",
        "questions_by_type": dict(collections.Counter(kinds)),
        "exact_match": by_type(hits, kinds),
        "prior_baseline": {"answers": guess, **by_type(prior_hits, kinds)},
        "image_tokens": int(features.shape[1]),
        "clip": json.loads((clip_dir / "training.json").read_text()),
        "llava": json.loads((adapter_dir / "training.json").read_text()),
        "evaluate_seconds": round(time.time() - t0, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    record["earlier_adapters"] = earlier(out, record["llava"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record
