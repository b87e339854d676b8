"""The task registry: the same names ModelSpec validates, and checkpoints loaded for the task they record."""

from __future__ import annotations

import torch

from models import loading
from models.spec import TASKS as TASK_NAMES
from tasks import TASKS, Task, load_checkpoint
from tasks.base import ImageTask, TextTask


def test_registry_names_equal_the_model_spec_names():
    assert tuple(TASKS) == TASK_NAMES
    assert all(isinstance(t, Task) and t.name == name for name, t in TASKS.items())


def test_modality_follows_the_task_family():
    assert {n for n, t in TASKS.items() if isinstance(t, TextTask)} == {"causal-lm", "feature-extraction"}
    assert {n for n, t in TASKS.items() if isinstance(t, ImageTask)} == {"image-classification",
                                                                        "image-feature-extraction",
                                                                        "image-text-to-text"}
    assert {t.modality for t in TASKS.values()} == {"text", "images"}
    assert [n for n, t in TASKS.items() if t.embeds] == ["feature-extraction", "image-feature-extraction"]
    assert [n for n, t in TASKS.items() if t.gradients_in_train_mode] == ["feature-extraction"]
    assert [n for n, t in TASKS.items() if t.gradients_couple_samples] == ["feature-extraction"]


def test_load_checkpoint_uses_the_recorded_task(bert_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert_dir).eval()
    loading.save_checkpoint(model, AutoTokenizer.from_pretrained(bert_dir), tmp_path / "ck", "feature-extraction")
    assert loading.checkpoint_task(tmp_path / "ck") == "feature-extraction"
    loaded, tok = load_checkpoint(tmp_path / "ck")
    assert type(loaded) is type(model) and tok("a b")["input_ids"][0] == 101
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
