"""The CLIP stage: a small ViT image tower and a text tower trained together on easy-VQA.

The image tower is what the VLM sees through (64 patch tokens of an 8x8 grid: the token-heavy regime
token pruning is measured in); the text tower exists so that TRIM's question-patch similarity has a
trained text side. Captions are built from each image's shape and colour (read from its questions'
answers); the tokenizer's vocabulary also holds every question word, so questions embed without
<unk>. Besides the usual [CLS] embedding, the mean of the patch tokens is scored against the captions
too: the language model reads patch tokens, not [CLS], so they must carry shape and colour themselves.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data

PATCH, WIDTH, DEPTH, HEADS, MLP, TEXT_DEPTH, MAX_TEXT = 8, 128, 4, 4, 512, 2, 32
TEMPLATES = ("a {c} {s}", "a {c} {s} shape", "an image of a {c} {s}", "the {c} {s}", "there is a {c} {s}",
             "a {s} that is {c}", "the shape is a {c} {s}")
EVAL_TEMPLATE = "a {c} {s}"
CLASSES = [(c, s) for c in data.COLORS for s in data.SHAPES]  # 24 captions: index = colour * 3 + shape


def words(text: str) -> list[str]:
    """The tokenizer's pre-tokenization: lower-case words and punctuation runs."""
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def build_tokenizer(questions: list[str]):
    """Word-level tokenizer over the caption and question vocabulary: <bos> words <eos>, right-padded with <pad>."""
    from bench.fashion_mnist import word_tokenizer

    vocab_words = {w for t in TEMPLATES for w in words(t.format(c="", s=""))}
    vocab_words |= {w for c, s in CLASSES for w in (c, s)} | {w for q in questions for w in words(q)}
    return word_tokenizer(vocab_words, punctuation=True, max_length=MAX_TEXT)


def vision_config() -> dict:
    return dict(image_size=data.SIZE, patch_size=PATCH, num_channels=3, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                num_attention_heads=HEADS, intermediate_size=MLP)


def build_clip(vocab_size: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=TEXT_DEPTH,
                num_attention_heads=HEADS, max_position_embeddings=MAX_TEXT, pad_token_id=0, bos_token_id=2,
                eos_token_id=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision_config(), projection_dim=WIDTH))


def captions(tokenizer, template: str | None, rng: random.Random) -> torch.Tensor:
    """Token ids [24, MAX_TEXT] of one caption per (colour, shape) class (a random template each when None)."""
    texts = [(template or rng.choice(TEMPLATES)).format(c=c, s=s) for c, s in CLASSES]
    return tokenizer(texts, padding="max_length", max_length=MAX_TEXT, return_tensors="pt")["input_ids"]


def class_logits(model, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP logits [n, 24] of the [CLS] embedding and of the mean patch token against the captions."""
    out = model.vision_model(pixel_values=x)
    patches = model.vision_model.post_layernorm(out.last_hidden_state[:, 1:].mean(1))
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    scale = model.logit_scale.exp()
    return tuple(scale * F.normalize(model.visual_projection(v), dim=-1) @ text.T for v in (out.pooler_output, patches))


def attribute_loss(logits: torch.Tensor, shape: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the shape and of the colour marginals, each over the images that have that label."""
    joint = logits.view(-1, len(data.COLORS), len(data.SHAPES))
    loss = logits.new_zeros(())
    for marginal, label in ((joint.logsumexp(1), shape), (joint.logsumexp(2), color)):
        known = label >= 0
        if known.any():
            loss = loss + F.cross_entropy(marginal[known], label[known])
    return loss


def train(epochs: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
    """Train from scratch on the 4,000 training images; returns (model, tokenizer, seconds)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    split = data.load("train")
    shape, color = (torch.from_numpy(a) for a in data.image_labels(split))
    tokenizer = build_tokenizer(split.questions)
    model = build_clip(len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    per_epoch = len(split.images) // batch_size
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    bar = tqdm(total=steps, desc="clip", mininterval=10)
    for _ in range(epochs):
        order = torch.randperm(len(split.images))
        for i in range(per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = data.pixels(split.images[idx.numpy()])
            flip = torch.rand(len(idx)) < 0.5  # a mirrored shape is the same shape
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            cls, patches = class_logits(model, x, captions(tokenizer, None, rng))
            loss = attribute_loss(cls, shape[idx], color[idx]) + attribute_loss(patches, shape[idx], color[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval(), tokenizer, time.time() - t0


@torch.no_grad()
def probe(model, tokenizer, split: data.Split) -> dict[str, float]:
    """Zero-shot accuracy on the split's images: nearest of the 24 captions, read back as shape and colour.

    Both the [CLS] embedding and the mean patch token are probed (the VLM reads the patches).
    """
    shape, color = data.image_labels(split)
    ids = captions(tokenizer, EVAL_TEMPLATE, random.Random(0))
    preds: dict[str, list[np.ndarray]] = {"cls": [], "patches": []}
    for i in range(0, len(split.images), 250):
        for key, logits in zip(preds, class_logits(model, data.pixels(split.images[i:i + 250]), ids)):
            preds[key].append(logits.argmax(-1).numpy())
    out = {}
    for key, parts in preds.items():
        p = np.concatenate(parts)
        out[f"{key}_shape"] = float((p % 3 == shape)[shape >= 0].mean())
        out[f"{key}_color"] = float((p // 3 == color)[color >= 0].mean())
    return out


def save(model, tokenizer, folder: Path, record: dict) -> None:
    """fp16 safetensors, tokenizer and image processor, plus ``training.json`` (seed, epochs, seconds, probes)."""
    from transformers import CLIPImageProcessor

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(tmp, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(tmp)
    CLIPImageProcessor(size={"shortest_edge": data.SIZE}, crop_size={"height": data.SIZE, "width": data.SIZE},
                       image_mean=[data.MEAN] * 3, image_std=[data.STD] * 3).save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def run(out: Path, epochs: int, seed: int) -> dict:
    model, tokenizer, seconds = train(epochs, seed=seed)
    record = {"seed": seed, "epochs": epochs, "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "test_probe": probe(model, tokenizer, data.load("test"))}
    save(model, tokenizer, out, record)
    return record
