"""Fast, honest validation: hub ids without network fail at once with the fix, path typos are called
paths, relative paths mean the recipe's folder, `datasets` sources are checked before any run folder."""

from __future__ import annotations

import shutil

import pytest
import transformers
from huggingface_hub import constants

from core.errors import RecipeError
from core.network import hub_unreachable
from models.loading import resolve_source
from models.spec import ModelSpec
from pipeline.__main__ import main
from pipeline.recipe import load_recipe
from pipeline.runner import plan

from ..conftest import text_recipe, write_recipe

STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "sparsity": 0.5}]


@pytest.fixture
def no_hub_calls(monkeypatch):
    """Any question to the Hub fails the test: these errors must come before one."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.fixture
def hub_closed(monkeypatch):
    """No HF_HUB_OFFLINE, and an endpoint that refuses connections (the discard port on this machine)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_offline_hub_id_fails_at_once_with_the_fixes(monkeypatch, no_hub_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError) as e:
        resolve_source(ModelSpec(source="edgeprune-test/no-such-model", task="causal-lm"))
    msg = e.value.message
    assert e.value.field == "model.source" and "(HF_HUB_OFFLINE is set) with no cached copy" in msg
    for fix in ("a local model folder", "package:<module>/<path>", "run where the Hub can be reached"):
        assert fix in msg


def test_unreachable_hub_is_found_by_one_connection(hub_closed, no_hub_calls):
    assert hub_unreachable() == "127.0.0.1 cannot be reached: Connection refused"
    with pytest.raises(RecipeError) as e:
        resolve_source(ModelSpec(source="edgeprune-test/no-such-model", task="causal-lm"))
    assert e.value.message.startswith("'edgeprune-test/no-such-model' is not a local folder (relative paths are read "
                                      "from the recipe's folder), and the Hugging Face Hub is out of reach (127.0.0.1")


def test_a_typo_under_an_existing_folder_is_a_missing_path(bert_dir, tmp_path, hub_closed, no_hub_calls):
    shutil.copytree(bert_dir, tmp_path / "models" / "bert")
    recipe = text_recipe(tmp_path, "feature-extraction", STAGES)
    recipe["model"]["source"] = "models/bret"  # org/name-shaped, but models/ is a folder next to the recipe
    with pytest.raises(RecipeError) as e:
        plan(load_recipe(write_recipe(tmp_path, recipe)))
    assert e.value.message.startswith(f"no such file or folder '{tmp_path}/models/bret'; '{tmp_path}/models' holds: bert")


def test_relative_paths_resolve_against_the_recipe_folder(bert_dir, tmp_path, monkeypatch):
    shutil.copytree(bert_dir, tmp_path / "recipes" / "models" / "bert")
    (tmp_path / "recipes" / "data").mkdir()
    (tmp_path / "recipes" / "data" / "calib.txt").write_text("Some calibration text for the tiny model. " * 20)
    recipe = text_recipe(tmp_path, "feature-extraction", STAGES, calibration={"source": "files", "path": "data/calib.txt"})
    recipe["model"]["source"] = "models/bert"
    path = write_recipe(tmp_path / "recipes", recipe)
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    p = plan(load_recipe("recipes/recipe.yaml"))
    assert p.source.path == tmp_path / "recipes" / "models" / "bert"
    assert p.recipe.calibration.path == str(tmp_path / "recipes" / "data" / "calib.txt")
    assert load_recipe(path).model.source == str(tmp_path / "recipes" / "models" / "bert")


def test_hub_ids_stay_hub_ids(tmp_path):
    recipe = text_recipe(tmp_path, "feature-extraction", STAGES)
    recipe["model"]["source"] = "sentence-transformers/all-MiniLM-L6-v2"
    assert load_recipe(write_recipe(tmp_path, recipe)).model.source == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("change, field, says", [
    ({"data_files": "missing.txt"}, "calibration.dataset.data_files", "no such file '{tmp}/missing.txt'"),
    ({"split": "validation"}, "calibration.dataset.split", "split 'validation' not in the dataset; splits: train"),
    ({"column": "body"}, "calibration.dataset.column", "column 'body' in split 'train'; columns: text"),
])
def test_datasets_sources_are_checked_before_any_run_folder(bert_dir, tmp_path, capsys, change, field, says):
    pytest.importorskip("datasets")
    (tmp_path / "lines.txt").write_text("a first line of text for the dataset\na second line of text\n")
    dataset = {"name": "text", "data_files": "lines.txt", **change}  # relative: next to the recipe
    recipe = text_recipe(bert_dir, "feature-extraction", STAGES, calibration={"source": "datasets", "dataset": dataset})
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path), "--output", str(tmp_path / "runs" / "t")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {field}: {says.format(tmp=tmp_path)}")
    assert not (tmp_path / "runs").exists()  # neither the run folder nor runs/.t.partial
