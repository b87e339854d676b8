"""Structured pruning (FLAP, -sp baselines): formulas, the slice-equals-mask property, checkpoints."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from calibration.spec import CalibrationSpec
from core.errors import RecipeError, StageFailed
from export import onnx as onnx_export
from models.adapters import adapter_for, head_channels
from pipeline.recipe import _validate, parse_recipe
from pipeline.runner import plan, run
from stages.prune_structured import PruneStructured
from tasks import TASKS, load_checkpoint

from ..conftest import text_recipe, write_recipe


def _args(**kw):
    return _validate(PruneStructured.Args, {"type": "prune_structured", "method": "flap", "ratio": 0.5, **kw}, "s")


@pytest.mark.parametrize("kw, needs, kinds", [
    ({}, "dense-statistics", {"mean_var"}),
    ({"metric": "wifn", "bias_compensation": False}, "dense-statistics", {"sq_norm"}),
    ({"method": "wanda-sp"}, "data", set()),  # UL: per-layer decisions on the model pruned so far
    ({"method": "wanda-sp", "structure": "AL-AM"}, "dense-statistics", {"sq_norm"}),
    ({"method": "wanda-sp", "bias_compensation": True, "structure": "AL-MM"}, "dense-statistics",
     {"sq_norm", "mean_var"}),
    ({"method": "magnitude-sp"}, False, set()),
    ({"method": "magnitude-sp", "bias_compensation": True}, "dense-statistics", {"mean_var"}),
])
def test_calibration_needs_come_from_the_score(kw, needs, kinds):
    args = _args(**kw)
    assert PruneStructured.needs_calibration(args) == needs and PruneStructured.statistics(args) == kinds


def test_defaults_per_method_and_description():
    flap, sp = _args(), _args(method="wanda-sp")
    assert (flap.metric, flap.structure, flap.bias_compensation, flap.square_attention) == ("wifv", "AL-AM", True, True)
    assert (sp.structure, sp.bias_compensation, sp.square_attention) == ("UL-UM", False, False)
    assert "metric" not in sp.model_dump() and list(flap.model_dump())[:4] == ["type", "name", "method", "ratio"]
    assert PruneStructured.describe(_args(ratio=0.25)) == "flap AL-AM ratio 0.25"


def _fixture_model(kind, bert_dir, llama_dir):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if kind == "bert":
        return AutoModel.from_pretrained(bert_dir).eval(), AutoTokenizer.from_pretrained(bert_dir), "bert", "feature-extraction"
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir), "llama", "causal-lm"


@pytest.mark.parametrize("kind, gqa", [("bert", "group"), ("llama", "group"), ("llama", "per-group")])
def test_sliced_model_equals_masked_dense_model(kind, gqa, bert_dir, llama_dir):
    model, tok, family, task = _fixture_model(kind, bert_dir, llama_dir)
    adapter = adapter_for(family, task)
    batches = TASKS[task].calibration_batches(tok, CalibrationSpec(num_samples=6, seq_len=16, batch_size=3))
    blocks = adapter.blocks(model)
    stats = LayerwiseEngine(model, adapter, batches).run(
        {b.index: {n: model.get_submodule(n) for n in b.linears} for b in blocks}, {"mean_var"}, "dense")
    masked = copy.deepcopy(model)
    stage = PruneStructured(_args(structure="UL-UM", align=8, gqa=gqa, min_heads=1))
    ctx = SimpleNamespace(model=model, adapter=adapter)  # in memory: every block is held
    with torch.no_grad():
        plans = stage._plan(ctx, blocks, stats, len(blocks), held=True)
        removed_any = False
        for p in plans:
            b = p.block
            heads_out = sorted(set(range(b.num_heads)) - set(p.heads))
            ch_out = sorted(set(range(b.intermediate_size)) - set(p.channels))
            removed_any |= bool(heads_out) and bool(ch_out)
            for name, cols in ((b.o, head_channels(heads_out, b.head_dim)), (b.mlp_out, torch.tensor(ch_out))):
                lin = masked.get_submodule(name)
                comp = lin.weight[:, cols] @ Stats(stats[name]).mean[cols]  # b = W[:, P] mu[P]
                lin.weight[:, cols] = 0
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
                lin.bias += comp
            stage._apply(ctx, p, stats)
    assert removed_any
    sliced = adapter.blocks(model)
    if gqa == "per-group":
        assert all(b.num_kv_heads == 2 and b.num_heads == 2 for b in sliced)  # one query head per group went
    ids = batches.batches[0].inputs["input_ids"]
    with torch.no_grad():
        a, b = model(input_ids=ids), masked(input_ids=ids)
    out = "logits" if kind == "llama" else "last_hidden_state"
    torch.testing.assert_close(getattr(a, out), getattr(b, out), rtol=1e-5, atol=1e-5)


FLAP = {"type": "prune_structured", "method": "flap", "ratio": 0.4, "align": 8}


def test_flap_run_ratio_floors_roundtrip_and_onnx(llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, dict(FLAP), {"type": "export"}]
    out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages)), output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    st = m["stages"][1]["metrics"]
    # within one unit of granularity: a KV group (6*16*64 params) of the 73,728 prunable ones
    assert abs(st["achieved_ratio"] - 0.4) <= 6 * 16 * 64 / 73_728
    assert all(layer["heads"] >= 1 and layer["mlp_channels"] >= 8 and layer["mlp_channels"] % 8 == 0
               for layer in st["layers"])
    assert m["model"]["params_after"] < m["model"]["params_before"]
    assert m["onnx"]["parity"]["max_rel_err"] <= 1e-4

    ids = torch.randint(0, 30000, (2, 16))
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = ("import numpy as np, torch, sys; from tasks import load_checkpoint; "
            f"m, _ = load_checkpoint({str(out / 'checkpoint')!r}); "
            f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r})); "
            f"np.save({str(tmp_path / 'fresh.npy')!r}, m(input_ids=ids).logits.detach().numpy())")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    fresh = np.load(tmp_path / "fresh.npy")
    model, _ = load_checkpoint(out / "checkpoint")
    with torch.no_grad():
        here = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(fresh, here, rtol=1e-6, atol=1e-6)
    shapes = json.loads((out / "checkpoint" / "config.json").read_text())["edgeprune_structure"]
    assert [s["intermediate_size"] for s in shapes] == [layer["mlp_channels"] for layer in st["layers"]]
    assert all(s["mlp_out_bias"] for s in shapes)  # bias compensation added a bias Llama does not have
    sess = onnx_export.session(out / "model.onnx")
    got = sess.run(None, {"input_ids": ids[:2].numpy()})[0]
    np.testing.assert_allclose(got, here, rtol=1e-4, atol=1e-4 * np.abs(here).max())


def test_resume_restores_a_sliced_model(bert_dir, tmp_path):
    stages = [{"type": "calibrate"}, dict(FLAP, ratio=0.3), {"type": "export"}]
    strict = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages, export={"rtol": 1e-12}), "s.yaml")
    with pytest.raises(StageFailed):
        run(strict, output=tmp_path / "out")
    ok = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages), "ok.yaml")
    m = json.loads((run(ok, output=tmp_path / "out", resume=True) / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["resumed", "resumed", "ran"]
    assert m["model"]["params_after"] < m["model"]["params_before"]


@pytest.mark.parametrize("change, field, words", [
    ({"gqa": "per-group"}, "stages[1].gqa", "needs grouped-query attention"),
    ({"align": 3}, "stages[1]", "align 3 is not allowed"),
    ({"method": "wanda-sp", "metric": "wifv"}, "stages[1].metric", "unknown key"),
    ({"method": "sparsegpt"}, "stages[1].method", "'sparsegpt' is not allowed; allowed: "),
    ({"remove_heads": 2}, "stages[1]", "only applies to structures UL-MM and AL-MM"),
    ({"align": 128}, "stages[1].align", "exceeds an MLP width"),
    ({"ratio": 1.0}, "stages[1].ratio", "out of range"),
])
def test_structured_recipe_errors(bert_dir, change, field, words):
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, {**FLAP, **change}])
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(recipe))
    assert e.value.field == field and words in e.value.message, str(e.value)
    if field.endswith(".method"):
        assert sorted(e.value.message.split("allowed: ")[1].split(", ")) == ["flap", "magnitude-sp", "wanda-sp"]


def test_flap_needs_a_fresh_calibration(bert_dir):
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "sparsity": 0.5}, dict(FLAP)]
    with pytest.raises(RecipeError, match="add another '- type: calibrate'"):
        parse_recipe(text_recipe(bert_dir, "feature-extraction", stages))


@pytest.mark.parametrize("method, source", [("wanda-sp", "sequential"), ("magnitude-sp", "none (weights only)")])
def test_baselines_run(llama_dir, tmp_path, method, source):
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": method, "ratio": 0.5, "align": 8}]
    out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages)), output=tmp_path / "out")
    st = json.loads((out / "manifest.json").read_text())["stages"][1]["metrics"]
    assert st["statistics"] == source and st["structure"] == "UL-UM" and not st["bias_compensation"]
    # UL-UM: int(0.5 * 2) = 1 of 2 KV groups and 64 of 128 channels in every layer
    assert [(layer["heads"], layer["kv_heads"], layer["mlp_channels"]) for layer in st["layers"]] == [(2, 1, 64)] * 2
    assert st["achieved_ratio"] == 0.5
