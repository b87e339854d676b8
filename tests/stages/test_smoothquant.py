"""The smoothquant stage on a tiny Llama: every group folded, outliers flattened, the function kept."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from calibration.layerwise import LayerwiseEngine
from calibration.spec import CalibrationSpec
from core.errors import StageFailed
from models.adapters import adapter_for
from stages.context import Statistics
from stages.smoothquant import SmoothQuant, SmoothQuantArgs
from tasks import TASKS


def _ctx(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    adapter = adapter_for("llama", "causal-lm")
    batches = TASKS["causal-lm"].calibration_batches(AutoTokenizer.from_pretrained(llama_dir),
                                                     CalibrationSpec(num_samples=4, seq_len=16, batch_size=2))
    blocks = adapter.blocks(model)
    dense = LayerwiseEngine(model, adapter, batches).run(
        {b.index: {n: model.get_submodule(n) for n in b.linears} for b in blocks}, {"abs_max"}, "dense")
    ctx = SimpleNamespace(model=model, adapter=adapter, statistics=Statistics(dense=dense),
                          held=lambda prefix, write: contextlib.nullcontext())  # in memory: RunContext.held is a no-op
    return ctx, batches


def test_declarations():
    args = SmoothQuantArgs(type="smoothquant", alpha=0.8)
    assert SmoothQuant.needs_calibration(args) == "dense-statistics" and SmoothQuant.statistics(args) == {"abs_max"}
    assert SmoothQuant.describe(args) == "alpha 0.8"


def test_run_folds_every_group_and_keeps_the_function(llama_dir, tmp_path):
    ctx, batches = _ctx(llama_dir)
    ids = batches.batches[0].inputs["input_ids"]
    with torch.no_grad():
        before = ctx.model(input_ids=ids).logits
    result = SmoothQuant(SmoothQuantArgs(type="smoothquant", alpha=0.5)).run(ctx, tmp_path)
    with torch.no_grad():
        after = ctx.model(input_ids=ids).logits
    m, rows = result.metrics, result.tables[0].rows
    assert m["groups"] == len(rows) == 4 and {r[1] for r in rows} == {2, 3}  # gate/up and q/k/v per block
    assert m["outlier_ratio_after"] < m["outlier_ratio_before"]
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4


def test_a_norm_without_weight_fails_the_stage(llama_dir, tmp_path):
    ctx, _ = _ctx(llama_dir)
    norm_name = ctx.adapter.smoothing_groups(ctx.model)[0][0]
    del ctx.model.get_submodule(norm_name).weight
    ctx.model.get_submodule(norm_name).weight = None
    with pytest.raises(StageFailed, match="no affine weight"):
        SmoothQuant(SmoothQuantArgs(type="smoothquant")).run(ctx, tmp_path)
