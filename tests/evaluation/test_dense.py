"""The dense reference graph: exported once per source, task and shapes, then read from the cache."""

from __future__ import annotations

import torch

from evaluation.dense import dense_onnx
from export.spec import ExportSpec
from models.spec import ModelSpec


def test_cached_by_shapes(llama_onnx, monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path))
    tm, _, _, (ids,) = llama_onnx
    spec, ex = ModelSpec(source="x", task="causal-lm"), ExportSpec(batch_size=1, seq_len=16)
    path = dense_onnx(tm, (ids,), "a" * 64, spec, ex)
    assert path.is_file() and path.parent == tmp_path / "onnx"
    stamp = path.stat().st_mtime_ns
    assert dense_onnx(tm, (ids,), "a" * 64, spec, ex) == path and path.stat().st_mtime_ns == stamp
    other = dense_onnx(tm, (torch.zeros(1, 8, dtype=torch.long),), "a" * 64, spec, ex)
    assert other != path and other.is_file()
