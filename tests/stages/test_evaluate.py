"""Evaluate stage: the task's data and metrics, ONNX Runtime when exported else PyTorch, Lee required."""

from __future__ import annotations

import json

import pytest

from calibration import sources
from core.errors import RecipeError
from pipeline.recipe import load_recipe
from pipeline.runner import plan, run

from ..conftest import text_recipe, write_recipe


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_exported_encoder_against_itself_with_lee(bert_dir, tmp_path):
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "export"}, {"type": "evaluate"}],
                         evaluation={"lee": True})
    ev = _manifest(run(write_recipe(tmp_path, recipe), output=tmp_path / "out"))["evaluation"]
    assert ev["backend"] == "onnxruntime" and ev["data"]["kind"] == "random paragraphs (20+ words)"
    assert ev["comparison"] == {"mean_cosine": 1.0, "min_cosine": 1.0, "samples": 4}
    assert ev["dense"]["lee"] == ev["compressed"]["lee"] and set(ev["dense"]["lee"]) == {"pearson", "spearman"}
    assert ev["lee_protocol"] == {"documents": 50, "pairs": 1225, "seq_len": 16, "source": sources.LEE_SOURCE}
    assert ev["size"]["dense"] == ev["size"]["compressed"] and ev["size"]["dense"]["flops"] > 0
    assert ev["latency"]["runs"] == 5 and ev["latency"]["batch_size"] == 2
    assert ev["latency"]["providers"] == ["CPUExecutionProvider"]  # evaluation.runtime's default


def test_unexported_decoder_runs_in_pytorch(llama_dir, tmp_path):
    recipe = text_recipe(llama_dir, "causal-lm", [{"type": "evaluate"}])
    ev = _manifest(run(write_recipe(tmp_path, recipe), output=tmp_path / "out"))["evaluation"]
    assert ev["backend"] == "pytorch" and "latency" not in ev and "flops" not in ev["size"]["dense"]
    assert ev["data"]["windows"] == 4 and ev["data"]["seq_len"] == 16
    assert ev["comparison"] == {"perplexity_ratio": 1.0, "token_agreement": 1.0} and ev["dense"] == ev["compressed"]


def test_missing_lee_data_fails_before_any_work(bert_dir, llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "LEE", tmp_path / "nowhere")
    stages = [{"type": "evaluate"}]
    path = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages, evaluation={"lee": True}))
    with pytest.raises(RecipeError, match="Lee benchmark is not installed") as e:
        plan(load_recipe(path))
    assert e.value.field == "evaluation.lee"
    plan(load_recipe(write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages), "off.yaml")))
    plan(load_recipe(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages,
                                                        evaluation={"lee": True}), "lm.yaml")))
