"""Fashion-MNIST, and the two small models token pruning is measured on (no pretrained ViT/CLIP installs here).

Data: Debian's ``dataset-fashion-mnist`` (MIT; 60,000 train / 10,000 test 28x28 grayscale images,
10 classes), fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no install, no root).
Models, trained from scratch on the 60,000 training images with a fixed seed:

- ``vit``: ViTForImageClassification, 28x28 input, 4x4 patches (7x7 = 49 patch tokens + [CLS]),
  6 blocks of width 64;
- ``clip``: CLIPModel with the same vision tower and a 2-block text tower over a word-level
  vocabulary, trained on class-name captions ("a photo of a sneaker"), so its image embedding
  classifies zero-shot against caption embeddings and TRIM has a real text side.

    python bench/fashion_mnist.py [--models vit clip] [--epochs 2] [--out bench/models]
"""

from __future__ import annotations

import argparse
import gzip
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.loading import cache_dir  # noqa: E402

PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "a product photo of a {}",
             "a black and white photo of a {}")
EVAL_TEMPLATE = "a photo of a {}"
MODELS = ROOT / "bench" / "models"
SIZE, PATCH, WIDTH, DEPTH, HEADS, MLP = 28, 4, 64, 6, 4, 128
MEAN = STD = 0.5  # the saved image processors normalise the same way


def fetch() -> Path:
    """The folder with the four IDX files, downloaded once into the pipeline cache."""
    folder = cache_dir() / "fashion-mnist"
    if all((folder / f).is_file() for pair in FILES.values() for f in pair):
        return folder
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SystemExit(f"Fashion-MNIST comes from the Debian package {PACKAGE}: needs apt-get and dpkg")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        found = {p.name: p for p in (Path(tmp) / "x").rglob("*-ubyte.gz")}
        folder.mkdir(parents=True, exist_ok=True)
        for pair in FILES.values():
            for name in pair:
                shutil.copy(found[name], folder / name)
    return folder


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) from the IDX files (16- and 8-byte headers)."""
    folder = fetch()
    images_file, labels_file = FILES[split]
    images = np.frombuffer(gzip.decompress((folder / images_file).read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress((folder / labels_file).read_bytes()), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def pixels(images: np.ndarray) -> torch.Tensor:
    """[n, 3, 28, 28] float, exactly what the saved image processor produces from the grayscale image as RGB."""
    x = (torch.tensor(images, dtype=torch.float32) / 255.0 - MEAN) / STD
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def image_folder(split: str, per_class: int, folder: Path, offset: int = 0) -> Path:
    """``per_class`` PNGs of each class in one subfolder per class (the pipeline's ``images`` source)."""
    from PIL import Image

    images, labels = load(split)
    if folder.exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c, name in enumerate(CLASSES):
        (tmp / f"{c}-{name.replace(' ', '_')}").mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[offset:offset + per_class]:
            Image.fromarray(images[i]).save(tmp / f"{c}-{name.replace(' ', '_')}" / f"{i:05d}.png")
    tmp.rename(folder)
    return folder


def vision_config() -> dict:
    return dict(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=WIDTH, num_hidden_layers=DEPTH,
                num_attention_heads=HEADS, intermediate_size=MLP)


def build_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(**vision_config(), num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
                    label2id={c: i for i, c in enumerate(CLASSES)}, hidden_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def build_tokenizer():
    """Word-level tokenizer over the caption vocabulary: <bos> words <eos>, right-padded with <pad>."""
    return word_tokenizer({w for t in TEMPLATES for w in t.format("").split()} | {w for c in CLASSES for w in c.split()})


def word_tokenizer(words: set[str], punctuation: bool = False, max_length: int | None = None):
    """Word-level tokenizer over ``words`` (ids 0-3: <pad> <unk> <bos> <eos>, then the sorted words):
    <bos> words <eos>, lower-cased, split on whitespace (and punctuation runs with ``punctuation``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if punctuation else pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    limit = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", **limit)


def build_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=2,
                num_attention_heads=HEADS, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision_config(), projection_dim=WIDTH))


def captions(tokenizer, template: str | None, rng: random.Random) -> torch.Tensor:
    """Token ids [10, 16] of one caption per class (a random template per class when ``template`` is None)."""
    texts = [(template or rng.choice(TEMPLATES)).format(c) for c in CLASSES]
    return tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]


def class_logits(model, tokenizer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CLIP logits of images against the 10 class captions."""
    image = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    return model.logit_scale.exp() * image @ text.T


def train(kind: str, epochs: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple[object, object]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    images, labels = load("train")
    tokenizer = build_tokenizer() if kind == "clip" else None
    model = build_clip(tokenizer) if kind == "clip" else build_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0, step = time.time(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size].numpy()
            x, y = pixels(images[idx]), torch.from_numpy(labels[idx])
            if kind == "clip":
                logits = class_logits(model, tokenizer, x, captions(tokenizer, None, rng))
            else:
                logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                print(f"{kind} epoch {epoch} step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s",
                      flush=True)
    return model.eval(), tokenizer


@torch.no_grad()
def accuracy(kind: str, model, tokenizer) -> float:
    images, labels = load("test")
    ids = captions(tokenizer, EVAL_TEMPLATE, random.Random(0)) if kind == "clip" else None
    correct = 0
    for i in range(0, len(images), 500):
        x = pixels(images[i:i + 500])
        logits = class_logits(model, tokenizer, x, ids) if kind == "clip" else model(pixel_values=x).logits
        correct += int((logits.argmax(-1).numpy() == labels[i:i + 500]).sum())
    return correct / len(images)


def save(kind: str, model, tokenizer, folder: Path) -> None:
    from transformers import CLIPImageProcessor, ViTImageProcessor

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    size = {"height": SIZE, "width": SIZE}
    if kind == "clip":
        tokenizer.save_pretrained(tmp)
        CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size=size, image_mean=[MEAN] * 3,
                           image_std=[STD] * 3).save_pretrained(tmp)
    else:
        ViTImageProcessor(size=size, image_mean=[MEAN] * 3, image_std=[STD] * 3).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def ensure(kind: str, epochs: int = 2, out: Path = MODELS) -> Path:
    """The trained model folder, training it first if it is not there."""
    folder = out / f"fashion-mnist-{kind}"
    if not (folder / "config.json").is_file():
        # One thread: these small matrices gain little from a second one, and on a busy machine two
        # spinning threads per process are several times slower (measured: 11 s vs 2.3 s per step).
        torch.set_num_threads(1)
        model, tokenizer = train(kind, epochs)
        print(f"{kind}: test top-1 {accuracy(kind, model, tokenizer):.4f}")
        save(kind, model, tokenizer, folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit", "clip"], choices=["vit", "clip"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=MODELS)
    args = ap.parse_args()
    for kind in args.models:
        shutil.rmtree(args.out / f"fashion-mnist-{kind}", ignore_errors=True)
        print(f"wrote {ensure(kind, args.epochs, args.out)}")


if __name__ == "__main__":
    main()
