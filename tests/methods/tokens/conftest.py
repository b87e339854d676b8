"""Encoders and independent references shared by the selector tests: HF's own eager attention maps
and hidden states, and a helper that installs a selector in output mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.tokens.pruner import Placement, TokenPruner
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks import TASKS, TaskModel

PATCHES, GRID = 16, 4  # the conftest ViT/CLIP: 32x32 images, 8x8 patches


@pytest.fixture(scope="module")
def vit(vit_dir):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(vit_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clip(clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clip_vision(clip_dir):
    from models.loading import model_config, resolve_source

    spec = ModelSpec(source=str(clip_dir), task="image-feature-extraction")
    config = model_config(spec, resolve_source(spec), TASKS[spec.task])
    return TASKS[spec.task].auto_class("clip").from_pretrained(clip_dir, config=config, attn_implementation="eager").eval()


def text_tower(clip_dir):
    """CLIPTextModelWithProjection and tokenizer, loaded the way the stage loads them."""
    from models.loading import load_model, resolve_source

    spec = ModelSpec(source=str(clip_dir), task="feature-extraction")
    return load_model(spec, resolve_source(spec), TASKS[spec.task])


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_pass(model, x):
    """HF's own eager attention maps and hidden states (hidden_states[l + 1] is block l's output)."""
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    return [a.double().numpy() for a in out.attentions], [h.double().numpy() for h in out.hidden_states]


def select(model, task: str, method, layer: int, x, fuse=False, object_layer=None, **inputs):
    """Install ``method`` in output mode and return (features, indices) from the task model."""
    pruner = TokenPruner(model, adapter_for(model.config.model_type, task), method,
                         Placement(layer, fuse, True, object_layer), defaults=inputs)
    try:
        tm = TaskModel(model, ModelSpec(source="x", task=task))
        with torch.no_grad():
            features, idx = tm(*tm.example({"pixel_values": x}))
    finally:
        pruner.remove()
    return features.double().numpy(), idx.numpy()


def top_k_sorted(score: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-score, axis=-1, kind="stable")[:, :k], axis=-1)


def gathered(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.stack([x[b, idx[b]] for b in range(len(idx))])
