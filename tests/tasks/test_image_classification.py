"""image-classification: image batches with folder labels, logits, the label loss, top-1 metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibration.batches import Batch, Batches
from calibration.spec import CalibrationSpec
from core.errors import RecipeError
from evaluation.spec import EvaluationSpec
from models.spec import ModelSpec
from tasks import TASKS, HeldOut

TASK = TASKS["image-classification"]


@pytest.fixture(scope="module")
def vit(vit_dir):
    from transformers import AutoModelForImageClassification

    assert TASK.auto_class("vit") is AutoModelForImageClassification
    return AutoModelForImageClassification.from_pretrained(vit_dir).eval(), TASK.preprocessor(vit_dir)


def test_batches_carry_pixels_and_labels(vit, images_dir):
    _, processor = vit
    images = {"source": "images", "path": str(images_dir)}
    cal = TASK.calibration_batches(processor, CalibrationSpec(**images, num_samples=7, batch_size=3), image_size=32)
    assert [b.size for b in cal] == [3, 3, 1] and cal.batches[0].inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert cal.protocol["classes"] == ["checks", "gradient", "stripes"] and cal.batches[0].labels is not None
    ev = TASK.evaluation_batches(processor, EvaluationSpec(**images, num_samples=7), 2, 16, image_size=32)
    assert [b.size for b in ev] == [2, 2, 2] and ev.batches[0].labels.tolist() == [0, 0]  # the first images, in order
    with pytest.raises(RecipeError, match="fewer images than batch_size=32"):
        TASK.evaluation_batches(processor, EvaluationSpec(**images, num_samples=7), 32, 16, image_size=32)


def test_loss_uses_labels_or_the_models_own_top1(vit):
    model, _ = vit
    spec = ModelSpec(source="x", task="image-classification")
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        (logits,) = TASK.forward(model, {"pixel_values": pixels}, spec)
        labels = torch.tensor([0, 1, 2, 0])
        torch.testing.assert_close(TASK.gradient_loss(model, spec, {"pixel_values": pixels}, labels),
                                   F.cross_entropy(logits, labels, reduction="sum"))
        torch.testing.assert_close(TASK.gradient_loss(model, spec, {"pixel_values": pixels}, None),
                                   F.cross_entropy(logits, logits.argmax(-1), reduction="sum"))


def test_quality_is_top1_agreement_and_accuracy_when_labelled():
    dense = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    comp = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]], np.float32)
    labels = torch.tensor([0, 1, 1, 0])
    batches = Batches([Batch({"i": torch.arange(0, 2)}, labels[:2]), Batch({"i": torch.arange(2, 4)}, labels[2:])], "x")

    def run(values):
        return lambda b: [values[b["i"].numpy()]]

    q = TASK.quality(run(dense), run(comp), HeldOut(batches, None, 2, 1, lee=True))
    assert q == {"dense": {"top1_accuracy": 0.75}, "compressed": {"top1_accuracy": 0.25},
                 "comparison": {"top1_agreement": 0.5}}
    unlabelled = Batches([Batch(b.inputs) for b in batches], "x")
    assert TASK.quality(run(dense), run(comp), HeldOut(unlabelled, None, 2, 1, lee=True))["dense"] == {}
