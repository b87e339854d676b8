"""The quality gate of whole runs: a run that misses ``evaluation.accept`` is written, marked rejected,
exits 1 and is not published; one that meets it is accepted and pushed; without a gate the verdict
line reports quality and speed only."""

from __future__ import annotations

import json

import pytest

from core.errors import GateRejected, RecipeError
from pipeline.__main__ import main
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run

from ..conftest import text_recipe, write_recipe

MAGNITUDE_24 = {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"}  # no statistics needed


def _console(capsys) -> str:
    """What the run printed (rich writes to stderr and wraps long lines), as one line of words."""
    return " ".join(capsys.readouterr().err.split())


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_run_that_misses_the_gate_exits_1_is_marked_rejected_and_not_published(bert_dir, tmp_path, capsys):
    ref = f"{tmp_path / 'reg'}/rejected:v1"
    recipe = text_recipe(bert_dir, "feature-extraction", [MAGNITUDE_24, {"type": "export"}, {"type": "evaluate"}],
                         evaluation={"accept": {"min_mean_cosine": 1.0, "min_min_cosine": -1}},
                         publish={"ref": ref})
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path, recipe)), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "--resume" not in err
    assert errors[0].startswith("error: evaluation.accept: the artifact misses the quality gate (mean_cosine ")
    assert "marked rejected in manifest.json and was not published" in errors[0]
    m = _manifest(out)
    v = m["verdict"]
    assert v["accepted"] is False and [c["ok"] for c in v["checks"]] == [False, True]
    assert v["quality"]["mean_cosine"] == m["evaluation"]["comparison"]["mean_cosine"] < 1
    assert v["speed"]["speedup"] == m["evaluation"]["latency"]["speedup"] and "onnx_bytes_ratio" in v["speed"]
    assert v["line"].startswith("verdict: mean_cosine ") and "REJECTED (mean_cosine " in v["line"]
    assert (out / "report.md").read_text().rstrip().endswith(f"**{v['line']}**")
    assert not (tmp_path / "reg").exists()  # nothing pushed


def test_a_run_that_meets_the_gate_is_accepted_and_published(bert_dir, tmp_path, capsys):
    ref = f"{tmp_path / 'reg'}/accepted:v1"
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "export"}, {"type": "evaluate"}],
                         evaluation={"accept": {"min_mean_cosine": 0.97}}, publish={"ref": ref})
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    v = _manifest(out)["verdict"]
    assert v["accepted"] is True and v["checks"][0]["value"] == 1.0
    assert v["line"].endswith(": ACCEPTED (min_mean_cosine 0.97)") and v["line"] in _console(capsys)
    assert (tmp_path / "reg" / "accepted" / "index.json").is_file()


def test_without_a_gate_the_run_ends_with_a_verdict_line_without_pass_or_fail(llama_dir, tmp_path, capsys):
    out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", [{"type": "evaluate"}])),
              output=tmp_path / "out")
    v = _manifest(out)["verdict"]
    line = "verdict: perplexity_ratio 1, token_agreement 1; nonzero_params x1 of dense: no quality gate " \
           "(set evaluation.accept)"
    assert v["accepted"] is None and v["line"] == line and line in _console(capsys)
    no_eval = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", [{"type": "export"}]), "r2.yaml"),
                  output=tmp_path / "out2")
    assert _manifest(no_eval)["verdict"] is None


def test_gate_failure_is_an_exit_1_pipeline_error():
    assert issubclass(GateRejected, Exception) and GateRejected("x").exit_code == 1


@pytest.mark.parametrize("stages, accept, field, words", [
    ([{"type": "evaluate"}], {"min_mean_cosine": 0.97}, "evaluation.accept.min_mean_cosine",
     "task 'causal-lm' has no metric for min_mean_cosine (its gate fields: max_perplexity_ratio, min_token_agreement)"),
    ([{"type": "export"}], {"max_perplexity_ratio": 1.15}, "evaluation.accept",
     "the quality gate reads the evaluate stage's numbers; add '- type: evaluate' last"),
    ([{"type": "evaluate"}], {}, "evaluation.accept", "set at least one bound"),
    ([{"type": "evaluate"}], {"max_perplexity_ratio": 0.5}, "evaluation.accept.max_perplexity_ratio",
     "greater than or equal to 1"),
])
def test_gate_fields_are_checked_before_any_work(llama_dir, stages, accept, field, words):
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(llama_dir, "causal-lm", stages, evaluation={"accept": accept})))
    assert e.value.field == field and words in e.value.message, str(e.value)
