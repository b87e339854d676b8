"""easy-VQA (PyPI ``easy-vqa``, MIT): 64x64 RGB images of one coloured shape, questions, 13 one-word answers.

Everything here is read from the installed package; nothing is downloaded. Each image's shape and
colour are not shipped as labels, so they are read back from its questions' answers (every image has
at least one question that names each).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "black", "gray")
TYPES = ("yes/no", "color", "shape")
MEAN = STD = 0.5  # the saved image processor normalises the same way
SIZE = 64


@dataclass(frozen=True)
class Split:
    """One split: images [n, 64, 64, 3] uint8, and per question its text, answer and image row."""

    images: np.ndarray
    questions: list[str]
    answers: list[str]
    image_rows: np.ndarray

    def kinds(self) -> list[str]:
        return [answer_type(a) for a in self.answers]


def answer_type(answer: str) -> str:
    """yes/no, color or shape: the question type easy-VQA's answers imply."""
    return "yes/no" if answer in ("yes", "no") else "color" if answer in COLORS else "shape"


def load(split: str) -> Split:
    """The ``train`` (4,000 images, 38,575 questions) or ``test`` (1,000 / 9,673) split."""
    import easy_vqa
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    questions, answers, ids = (easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    order = sorted(paths)
    row = {image_id: i for i, image_id in enumerate(order)}
    images = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in order])
    return Split(images, list(questions), list(answers), np.array([row[i] for i in ids]))


def image_labels(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(shape index, colour index) per image, read from its questions' answers; -1 where none says.

    A word answer names the shape or colour, and a question that names the other ("what is the blue
    shape?") gives that too; a yes/no question names what is present when its answer, negated for
    "not"/"no" questions, is yes.
    """
    labels = {"shape": np.full(len(split.images), -1), "color": np.full(len(split.images), -1)}
    for q, a, r in zip(split.questions, split.answers, split.image_rows):
        present = a in SHAPES + COLORS or (a == "yes") != bool(re.search(r"\b(not|no)\b", q))
        if a in SHAPES + COLORS:
            labels["shape" if a in SHAPES else "color"][r] = SHAPES.index(a) if a in SHAPES else COLORS.index(a)
        if not present:
            continue
        for kind, words in (("shape", SHAPES), ("color", COLORS)):
            named = [i for i, w in enumerate(words) if re.search(rf"\b{w}\b", q)]
            if named:
                labels[kind][r] = named[0]
    return labels["shape"], labels["color"]


def pixels(images: np.ndarray) -> torch.Tensor:
    """[n, 3, 64, 64] float, exactly what the saved CLIPImageProcessor produces from the PNG."""
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    return (x - MEAN) / STD
