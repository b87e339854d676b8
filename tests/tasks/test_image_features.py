"""image-feature-extraction: CLIP's vision tower embedding, no task loss, cosine to dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.batches import Batch, Batches
from core.errors import RecipeError
from models.loading import load_model, resolve_source
from models.spec import ModelSpec
from tasks import TASKS, HeldOut

TASK = TASKS["image-feature-extraction"]


def test_clip_loads_the_vision_tower_and_outputs_its_normalized_projection(clip_dir):
    from transformers import AutoModel, CLIPVisionModelWithProjection

    assert TASK.auto_class("clip") is CLIPVisionModelWithProjection and TASK.auto_class("vit") is AutoModel
    spec = ModelSpec(source=str(clip_dir), task=TASK.name)
    model, processor = load_model(spec, resolve_source(spec), TASK)
    assert type(model) is CLIPVisionModelWithProjection and type(processor).__name__.startswith("CLIPImageProcessor")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb, hidden = TASK.forward(model, {"pixel_values": pixels}, spec)
        torch.testing.assert_close(emb, torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds, dim=-1))
    assert emb.shape == (2, 16) and hidden.shape == (2, 17, 32)


def test_gradient_statistics_are_refused_with_the_field():
    with pytest.raises(RecipeError, match="image-feature-extraction has none") as e:
        TASK.check_gradients("stages[1].method")
    assert e.value.field == "stages[1].method"
    with pytest.raises(RecipeError):
        TASK.gradient_loss(None, ModelSpec(source="x", task=TASK.name), {}, None)
    for name in ("causal-lm", "feature-extraction", "image-classification"):
        TASKS[name].check_gradients("stages[1].method")


def test_quality_is_the_cosine_to_dense_only():
    dense = np.array([[1.0, 0.0], [0.0, 1.0]])
    comp = np.array([[1.0, 1.0], [0.0, 2.0]])
    batches = Batches([Batch({"i": torch.arange(2)})], "x")
    q = TASK.quality(lambda b: [dense], lambda b: [comp], HeldOut(batches, None, 2, 1, lee=True))
    assert q == {"dense": {}, "compressed": {},
                 "comparison": {"mean_cosine": round((2 ** -0.5 + 1) / 2, 5), "min_cosine": round(2 ** -0.5, 5),
                                "samples": 2}}
