"""End-to-end runs on tiny models: the run folder, manifest, artifacts, resume, force."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from core.errors import RecipeError, StageFailed
from core.files import sha256_path
from export import inspect as onnx_inspect
from export import onnx as onnx_export
from models.spec import ModelSpec
from pipeline.runner import run
from tasks import TASKS, TaskModel, load_checkpoint

from ..conftest import text_recipe, write_recipe

FULL = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4"},
        {"type": "export"}, {"type": "evaluate"}]


@pytest.fixture(scope="module")
def bert_run(bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert_run")
    return run(write_recipe(tmp, text_recipe(bert_dir, "feature-extraction", FULL)), output=tmp / "out")


def test_run_folder_layout_and_manifest(bert_run):
    names = {p.name for p in bert_run.iterdir()}
    assert {"recipe.yaml", "model.onnx", "checkpoint", "report.md", "events.jsonl", "manifest.json", "stages"} <= names
    assert not list(bert_run.parent.glob(".*.partial"))
    m = json.loads((bert_run / "manifest.json").read_text())
    assert m["schema"] == "edgeprune-manifest/1" and m["name"] == "t"
    assert set(m["model"]) >= {"source", "sha256", "architecture", "params_before", "params_after"}
    assert m["model"]["architecture"] == "bert" and len(m["model"]["sha256"]) == 64
    assert [s["type"] for s in m["stages"]] == ["calibrate", "prune_weights", "export", "evaluate"]
    assert all(s["seconds"] >= 0 and s["status"] == "ran" for s in m["stages"])
    assert m["stages"][1]["metrics"]["achieved_sparsity"] == 0.5
    assert m["onnx"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [2, 16]},
                                   {"name": "attention_mask", "dtype": "int64", "shape": [2, 16]}]
    assert m["onnx"]["parity"]["max_rel_err"] <= 1e-4
    ev = m["evaluation"]
    assert ev["backend"] == "onnxruntime" and 0.0 < ev["comparison"]["mean_cosine"] <= 1.0
    assert ev["latency"]["dense"]["median_ms"] > 0 and ev["size"]["dense"]["flops"] == ev["size"]["compressed"]["flops"]
    assert m["environment"]["packages"]["torch"]
    for a in m["artifacts"]:  # every file hashed, and the hashes are right
        assert sha256_path(bert_run / a["path"]) == a["sha256"]
    assert {"model.onnx", "recipe.yaml", "checkpoint/model.safetensors"} <= {a["path"] for a in m["artifacts"]}
    events = [json.loads(line) for line in (bert_run / "events.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in events if e["event"] == "stage_end"] == ["calibrate", "prune_weights", "export", "evaluate"]
    assert any(e["event"] == "progress" for e in events) and events[-1]["event"] == "run_end"
    report = (bert_run / "report.md").read_text()
    assert "## prune_weights: Sparsity per layer" in report
    assert "![sparsity per layer](stages/01-prune_weights/sparsity_per_layer.png)" in report
    assert (bert_run / "stages/01-prune_weights/sparsity_per_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_exported_weights_keep_2_of_4_along_k(bert_run):
    weights = onnx_inspect.linear_weights(onnx.load(bert_run / "model.onnx"))
    assert len(weights) == 12
    for name, w in weights.items():
        assert onnx_inspect.nm_violations(w, 2, 4) == 0, name
        assert (w == 0).mean() >= 0.5


def test_checkpoint_loads_and_matches_onnx(bert_run):
    model, tok = load_checkpoint(bert_run / "checkpoint")
    tm = TaskModel(model, ModelSpec(source="x", task="feature-extraction")).eval()
    enc = tok(["a short sentence", "another, slightly longer sentence here"], padding="max_length",
              max_length=16, truncation=True, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    par = onnx_export.parity(bert_run / "model.onnx", tm, tm.input_names, [inputs])
    assert par.max_rel_err < 1e-5
    q = model.encoder.layer[0].attention.self.query.weight
    assert ((q.view(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_llama_gblm_unstructured(llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "gblm", "sparsity": 0.5},
              {"type": "export"}, {"type": "evaluate"}]
    out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages)), output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert "gradients (8 samples)" in m["stages"][0]["metrics"]["statistics"]
    ev = m["evaluation"]
    assert ev["dense"]["perplexity"] > 1 and ev["compressed"]["perplexity"] > 1
    model, _ = load_checkpoint(out / "checkpoint")
    w = model.model.layers[1].mlp.down_proj.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # exactly half of every row
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # outside the blocks: untouched


def test_sequential_statistics_are_not_shared_across_gblm_norms(llama_dir, tmp_path, monkeypatch):
    """Block l's statistics depend on how blocks < l were pruned, so the score settings key the cache."""
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))  # empty: no other test's statistics
    def prune_info(norm):
        stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "gblm", "sparsity": 0.5,
                                          "gradient_norm": norm}]
        out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages), f"{norm}.yaml"),
                  output=tmp_path / norm, force=True)
        return json.loads((out / "manifest.json").read_text())["stages"][1]["metrics"]

    assert prune_info("l2")["cache"] == "miss"
    assert prune_info("l1")["cache"] == "miss"
    assert prune_info("l1")["cache"] == "hit"


def test_vit_classification_and_clip_towers(vit_dir, clip_dir, images_dir, tmp_path):
    images = {"source": "images", "path": str(images_dir)}
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "sparsity": 0.3},
              {"type": "export"}, {"type": "evaluate"}]
    recipe = {"name": "vit", "model": {"source": str(vit_dir), "task": "image-classification"},
              "calibration": {**images, "num_samples": 8, "batch_size": 4},
              "stages": stages, "export": {"batch_size": 2},
              "evaluation": {**images, "num_samples": 6, "latency": {"iterations": 5}}}
    m = json.loads((run(write_recipe(tmp_path, recipe), output=tmp_path / "vit") / "manifest.json").read_text())
    assert m["onnx"]["inputs"][0]["shape"] == [2, 3, 32, 32]
    assert set(m["evaluation"]["dense"]) == {"top1_accuracy"} and "top1_agreement" in m["evaluation"]["comparison"]

    recipe.update(name="clipv", model={"source": str(clip_dir), "task": "image-feature-extraction"})
    m = json.loads((run(write_recipe(tmp_path, recipe), output=tmp_path / "clipv") / "manifest.json").read_text())
    assert [o["shape"] for o in m["onnx"]["outputs"]] == [[2, 16], [2, 17, 32]]

    text = text_recipe(clip_dir, "feature-extraction", FULL)
    m = json.loads((run(write_recipe(tmp_path, text), output=tmp_path / "clipt") / "manifest.json").read_text())
    assert m["model"]["class"] == "CLIPTextModelWithProjection" and m["onnx"]["parity"]["max_rel_err"] <= 1e-4


def test_second_run_reuses_cached_statistics(llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "sparsity": 0.5}]
    path = write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages))
    first = json.loads((run(path, output=tmp_path / "a") / "manifest.json").read_text())
    second = json.loads((run(path, output=tmp_path / "b") / "manifest.json").read_text())
    assert first["stages"][1]["metrics"]["cache"] == "miss" and second["stages"][1]["metrics"]["cache"] == "hit"
    a = load_checkpoint(tmp_path / "a" / "checkpoint")[0].state_dict()
    b = load_checkpoint(tmp_path / "b" / "checkpoint")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_force_resume_and_failed_stage(bert_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "sparsity": 0.5}, {"type": "export"}]
    strict = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages, export={"rtol": 1e-12}),
                          "strict.yaml")
    out = tmp_path / "out"
    with pytest.raises(StageFailed, match="export.rtol"):
        run(strict, output=out)
    assert not out.exists() and (tmp_path / ".out.partial" / "stages" / "01-prune_weights" / "result.json").exists()

    ok = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages), "ok.yaml")
    run(ok, output=out, resume=True)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["resumed", "resumed", "ran"]
    # each stage's own peak memory, carried over from the partial run for the reused ones
    assert all(s["memory"]["peak_rss_mib"] > 50 and s["memory"]["since"] == "stage" for s in m["stages"])
    assert all(50 < s["memory"]["start_rss_mib"] <= s["memory"]["peak_rss_mib"] for s in m["stages"])
    report = (out / "report.md").read_text()
    assert "| peak memory (MiB) |" in report
    assert f"{m['stages'][2]['memory']['peak_rss_mib']:,.0f} (start {m['stages'][2]['memory']['start_rss_mib']:,.0f})" in report
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events.count("stage_reused") == 2
    assert not (out / "stages" / "01-prune_weights" / "model").exists()  # resume snapshots are dropped

    with pytest.raises(RecipeError, match="already exists"):
        run(ok, output=out)
    before = (out / "manifest.json").read_text()
    run(ok, output=out, force=True)
    assert (out / "manifest.json").read_text() != before
    assert not list(tmp_path.glob(".out.*"))
    w = onnx_inspect.linear_weights(onnx.load(out / "model.onnx"))["encoder.layer.0.output.dense"]
    assert np.isclose((w == 0).mean(), 0.5)


def test_dense_propagation_uses_calibrate_statistics(llama_dir, tmp_path):
    """Wanda with dense propagation = masks from one full forward of the dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibration.spec import CalibrationSpec

    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "sparsity": 0.5,
                                      "propagation": "dense"}]
    recipe = text_recipe(llama_dir, "causal-lm", stages)
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert "activations (sq_norm)" in m["stages"][0]["metrics"]["statistics"]
    pruned, _ = load_checkpoint(out / "checkpoint")

    dense = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    spec = CalibrationSpec(**recipe["calibration"])
    batches = TASKS["causal-lm"].calibration_batches(AutoTokenizer.from_pretrained(llama_dir), spec)
    linears = {n: mod for n, mod in dense.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n}
    sums = {n: 0.0 for n in linears}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: sums.__setitem__(n, sums[n] + (a[0] ** 2).sum((0, 1))))
             for n, mod in linears.items()]
    with torch.no_grad():
        for b in batches:
            dense(**b.inputs)
    for h in hooks:
        h.remove()
    for n, mod in linears.items():
        score = mod.weight.abs() * (sums[n] / spec.num_samples).sqrt()
        expected = torch.zeros_like(score, dtype=torch.bool).scatter_(
            1, torch.sort(score, dim=1, stable=True).indices[:, : score.shape[1] // 2], True)
        assert torch.equal(pruned.get_submodule(n).weight == 0, expected | (mod.weight == 0)), n
