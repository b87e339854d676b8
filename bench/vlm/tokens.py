"""Exact match of the trained easy-VQA VLM against the image tokens its language model reads, per selector.

Every selector of the pipeline's registry (methods/tokens/, built as the token_prune stage builds
it) sits at the VLM's feature layer (the vision tower's last block, ``output: true``) and keeps K
of the 64 patch tokens; the projector and the language model read those K. Exact match is
evaluate.py's teacher-forced score on its 1,000 held-out test questions, one question per sequence:
the question follows the K image tokens at positions K, K+1, ... as in the exported prefill graph.

The text-conditioned selectors (TRIM, CDPruner) score the patches against each question's own CLIP
text embedding (the committed easy-VQA CLIP's text tower, whose vision tower is the VLM's): TRIM's
setting. Random-K draws a fresh subset per question, seeded by (seed, question): mean and spread over
``RANDOM_SEEDS``. No fused token anywhere, so every row reads exactly K image tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from methods.tokens.random import per_image
from methods.tokens.text import TextEncoder
from stages.token_prune import keep_count

from . import data, evaluate, llava

KEEPS = (1.0, 0.5, 0.25, 0.11, 0.05)
METHODS = ("cls_attention", "global_attention", "trim", "divprune", "hiprune", "visionzip", "cdpruner", "random")
RANDOM_SEEDS = (0, 1, 2)
TASK = "image-feature-extraction"  # the CLIP vision tower on its own, as the adapters see it


class Towers:
    """The VLM's vision tower (with CLIP's visual projection, for the joint space) and its text tower."""

    def __init__(self, clip_dir: Path):
        from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        from models.adapters import adapter_for

        clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
        self.vision = _with_projection(CLIPVisionModelWithProjection, clip.config.vision_config, clip.config,
                                       {"vision_model": clip.vision_model, "visual_projection": clip.visual_projection})
        self.text = _with_projection(CLIPTextModelWithProjection, clip.config.text_config, clip.config,
                                     {"text_model": clip.text_model, "text_projection": clip.text_projection})
        self.tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        self.encoder = TextEncoder(self.text, self.tokenizer, self.text.config.max_position_embeddings)
        self.adapter = adapter_for(self.vision.config.model_type, TASK)
        self.layer = len(self.adapter.vision_blocks(self.vision)) - 1  # LLaVA's vision_feature_layer -1
        self.patches = self.adapter.vision_tokens(self.vision).patches

    def install(self, method: str, k: int):
        """The selector as the token_prune stage builds it (registry, its own Args, defaults, object layer)."""
        from methods.tokens import SELECTORS
        from methods.tokens.base import Env
        from methods.tokens.pruner import Placement, TokenPruner

        selector = SELECTORS[method]
        # the prompt only gives the default text_embeds input; each question's own embedding is fed instead
        fields = {"prompt": "What is in the image?", "text_len": self.text.config.max_position_embeddings} \
            if selector.text_tower else {}
        args = selector.Args(method=method, keep=k, fuse=False, **fields)
        blocks = len(self.adapter.vision_blocks(self.vision))
        object_layer = selector.resolve(args, self.layer, blocks, k, "bench")
        build = selector.build(args, k, Env(self.vision, self.adapter, 1, (self.text, self.tokenizer)))
        return TokenPruner(self.vision, self.adapter, build.method, Placement(self.layer, False, True, object_layer),
                           build.defaults)

    @torch.no_grad()
    def features(self, images: np.ndarray, questions: list[str], method: str | None, k: int, seed: int = 0,
                 batch: int = 250) -> torch.Tensor:
        """[n, K, width]: the patch features the projector reads for each (image, question) pair."""
        if method is None:
            return llava.vision_features(self.vision.vision_model, images)
        pruner = self.install(method, k)
        parts = []
        try:
            for i in range(0, len(images), batch):
                pixels = data.pixels(images[i:i + batch])
                inputs = {}
                if "text_embeds" in pruner.input_names:
                    inputs["text_embeds"] = self.encoder.embed(questions[i:i + batch])
                if "keep_idx" in pruner.input_names:
                    inputs["keep_idx"] = torch.from_numpy(np.stack([per_image(self.patches, k, seed, i + j)
                                                                   for j in range(len(pixels))]))
                parts.append(pruner.run(lambda p=pixels: self.vision(pixel_values=p), inputs)[0])
        finally:
            pruner.remove()
        return torch.cat(parts)


def _with_projection(cls, tower_config, config, parts: dict[str, torch.nn.Module]):
    """One tower of a full CLIPModel with its projection, as its own model (what the adapters and TRIM read)."""
    tower_config = type(tower_config)(**{**tower_config.to_dict(), "projection_dim": config.projection_dim})
    model = cls(tower_config)
    for name, module in parts.items():
        getattr(model, name).load_state_dict(module.state_dict())
    return model.eval()


def balanced(row: dict) -> float:
    """The mean of the three question types' exact match: 72% of the held-out questions are yes/no, which the
    overall score weighs accordingly; this weighs colour and shape questions alike."""
    return round(float(np.mean([row[t] for t in data.TYPES])), 4)


def run(clip_dir: Path, adapter_dir: Path, methods: list[str], keeps: list[float]) -> dict:
    """Exact match (all and by type) per method and keep; the unpruned model once."""
    lm, tokenizer = llava.load_language_model()
    adapter = llava.load(adapter_dir, lm)
    towers = Towers(clip_dir)
    test = data.load("test")
    order = np.concatenate(evaluate.held_out(test))
    kinds = [data.answer_type(test.answers[q]) for q in order]
    images, questions = test.images[test.image_rows[order]], [test.questions[q] for q in order]
    picks = [np.array([q]) for q in order]

    def score(method: str | None, k: int, seed: int = 0) -> dict:
        t0 = time.perf_counter()
        feats = towers.features(images, questions, method, k, seed)
        hits = evaluate.exact_match(lm, adapter, tokenizer, feats, test, picks)
        row = evaluate.by_type(hits, kinds)
        return {**row, "balanced": balanced(row), "seconds": round(time.perf_counter() - t0, 1)}

    rows = [{"method": "unpruned", "keep": 1.0, "k": towers.patches, **score(None, towers.patches)}]
    for keep in keeps:
        k = keep_count(keep, towers.patches, "--keeps")
        if k == towers.patches:
            continue
        for method in methods:
            if method == "random":
                runs = [score(method, k, s) for s in RANDOM_SEEDS]
                row = {key: round(float(np.mean([r[key] for r in runs])), 4) for key in runs[0]}
                row.update({f"{key}_std": round(float(np.std([r[key] for r in runs])), 4) for key in ("all", "balanced")})
            else:
                row = score(method, k)
            rows.append({"method": method, "keep": keep, "k": k, **row})
            print(f"{method:>16} K={k:>2}: {row['all']:.4f}", flush=True)
    return {"held_out": f"{len(order)} test questions (evaluate.py's held-out set), one per sequence",
            "layer": f"vision block {towers.layer} output (the VLM's feature layer), no fused token",
            "random_seeds": list(RANDOM_SEEDS), "rows": rows}


def markdown(record: dict, latency: dict | None = None, key: str = "all") -> str:
    """The README table: exact match (``key``: all questions, or ``balanced`` over the types) per selector
    (columns) and kept tokens (rows), with the time to first token of each K's prefill window where
    ``latency`` (latency.py's windows) has it."""
    rows = record["rows"]
    base = next(r for r in rows if r["method"] == "unpruned")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"))
    by_k: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r["method"] != "unpruned":
            by_k.setdefault(r["k"], {})[r["method"]] = r
    ttft = {v["image_tokens"]: v["first_token_ms_vs_first_run"] for v in (latency or {}).get("runs", {}).values()}
    timed = " time to first token |" if ttft else ""
    lines = ["| kept | " + " | ".join(f"`{m}`" for m in methods) + " |" + timed,
             "|---" * (len(methods) + 1 + bool(ttft)) + "|",
             f"| 64 (100%) | {base[key]:.3f} (unpruned) |" + " |" * (len(methods) - 1) + (" 1.00x |" if ttft else "")]
    for k, found in sorted(by_k.items(), reverse=True):
        best = max(v[key] for v in found.values())
        cells = []
        for m in methods:
            v = found[m][key]
            text = f"{v:.3f}" + (f" ± {found[m][key + '_std']:.3f}" if key + "_std" in found[m] else "")
            cells.append(f"**{text}**" if v == best else text)
        keep = next(iter(found.values()))["keep"]
        speed = (f" {ttft[k]:.2f}x |" if k in ttft else " |") if ttft else ""
        lines.append(f"| {k} ({keep:.0%}) | " + " | ".join(cells) + " |" + speed)
    return "\n".join(lines)
