"""Malformed recipes: one line naming the field, exit code 2, no traceback, no run folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.errors import RecipeError
from pipeline.recipe import load_recipe, parse_recipe
from pipeline.runner import plan

from ..conftest import text_recipe, write_recipe

WANDA = {"type": "prune_weights", "method": "wanda", "sparsity": 0.5}


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd)


def _error(recipe: dict, tmp_path) -> RecipeError:
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(recipe))
    return e.value


def test_default_recipe_is_valid():
    recipe = load_recipe("recipes/default.yaml")
    assert [s.type for s in recipe.stages] == ["calibrate", "prune_structured", "distill", "export", "quantize",
                                               "evaluate"]
    assert plan(recipe).source.model_type == "bert"


def test_sparse_recipe_is_the_default_with_2_of_4():
    recipe, default = load_recipe("recipes/minilm-2of4.yaml"), load_recipe("recipes/default.yaml")
    assert [s.type for s in recipe.stages if s.type != "prune_weights"] == [s.type for s in default.stages]
    assert recipe.stages[2].nm == (2, 4)
    assert plan(recipe).source.model_type == "bert"


@pytest.mark.parametrize("mutate, field, words", [
    (lambda r: r.update(colour="red"), "colour", "allowed keys: name, model"),
    (lambda r: r["stages"][1].update(sparsity=1.5), "stages[1].sparsity", "out of range"),
    (lambda r: r["stages"][1].update(spars=0.5), "stages[1].spars", "allowed keys: type, name, method, sparsity"),
    (lambda r: r["stages"][1].update(pattern="4:2", sparsity=None), "stages[1]", "0 < N < M"),
    (lambda r: r["stages"][1].update(pattern="2:4", sparsity=0.3), "stages[1]", "contradicts pattern"),
    (lambda r: r["stages"][1].update(pattern="dense"), "stages[1]", "'unstructured' or 'N:M'"),
    (lambda r: r["stages"][1].update(method="obs"), "stages[1].method", "'obs' is not allowed; allowed: "),
    (lambda r: r["calibration"].update(seq_len=0), "calibration.seq_len", "greater than or equal to 2"),
    (lambda r: r["calibration"].update(source="files"), "calibration", "needs 'path'"),
    (lambda r: r["stages"].append({"type": "train"}), "stages[4].type", "unknown stage type 'train'; allowed: calibrate"),
    (lambda r: r["stages"].pop(0), "stages[0]", "add '- type: calibrate' before it"),
    (lambda r: r["model"].update(task="translation"), "model.task", "'causal-lm'"),
    (lambda r: r.pop("model"), "model", "required"),
    (lambda r: r.update(name="bad name!"), "name", "pattern"),
    (lambda r: r["stages"].insert(3, WANDA), "stages[3]", "after it was exported"),
])
def test_schema_errors_name_the_field(bert_dir, tmp_path, mutate, field, words):
    recipe = text_recipe(bert_dir, "feature-extraction",
                         [{"type": "calibrate"}, dict(WANDA), {"type": "export"}, {"type": "evaluate"}])
    mutate(recipe)
    err = _error(recipe, tmp_path)
    assert err.field == field, str(err)
    assert words in err.message, str(err)


def test_resource_errors(bert_dir, tmp_path):
    base = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, dict(WANDA)])
    missing = {**base, "model": {"source": str(tmp_path / "nope"), "task": "feature-extraction"}}
    assert _error(missing, tmp_path).field == "model.source"

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    err = _error({**base, "model": {"source": str(gpt2), "task": "causal-lm"}}, tmp_path)
    assert err.field == "model.source" and "'gpt2' is not supported; supported: bert, clip" in err.message
    assert all(f" {t}," in err.message for t in ("gemma3_text", "llama", "phi3", "qwen3"))

    err = _error({**base, "model": {"source": str(bert_dir), "task": "causal-lm"}}, tmp_path)
    assert err.field == "model.task" and "allowed: feature-extraction" in err.message

    no_data = {**base, "calibration": {"source": "files", "path": str(tmp_path / "missing.txt")}}
    assert _error(no_data, tmp_path).field == "calibration.path"

    stages = [{"type": "calibrate"}, {**WANDA, "targets": ["re:.*nothing"]}]
    err = _error({**base, "stages": stages}, tmp_path)
    assert err.field == "stages[1].targets" and "no layer left" in err.message

    stages = [{"type": "calibrate"}, {**WANDA, "targets": ["re:(unclosed"]}]
    assert _error({**base, "stages": stages}, tmp_path).field == "stages[1].targets[0]"

    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:3"}]
    err = _error({**base, "stages": stages}, tmp_path)
    assert err.field == "stages[1].pattern" and "not divisible by 3" in err.message

    images = {**base, "calibration": {"source": "images", "path": str(tmp_path)}}
    assert "needs text" in _error(images, tmp_path).message


def test_cli_bad_recipe_exits_2_without_traceback_or_folder(bert_dir, tmp_path):
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, {**WANDA, "sparsity": 1.5}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "run"
    for command in (["run", str(path), "--output", str(out)], ["validate", str(path)]):
        proc = _cli(*command, cwd=tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith("error: stages[1].sparsity: 1.5 is out of range")
        assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
    assert not (tmp_path / "runs").exists()


def test_cli_yaml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")
    proc = _cli("validate", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: recipe: not valid YAML at line")
    proc = _cli("run", str(tmp_path / "absent.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("validate", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(" is a folder; give the recipe's YAML file")


def test_resolved_recipe_round_trips(bert_dir):
    recipe = parse_recipe(text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, dict(WANDA)]))
    import yaml

    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe and again.sha256() == recipe.sha256()
    assert again.calibration.dtype == "float32"  # defaults are written out
