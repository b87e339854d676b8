"""The distill stage on a tiny BERT pruned by FLAP 50% and Wanda 2:4: held-out fidelity goes up, no
pruned weight comes back, --resume continues from the saved step, and bad arguments name their field."""

from __future__ import annotations

import json

import pytest
import torch

import stages.distill
from core.errors import RecipeError
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from tasks import load_checkpoint

from ..conftest import text_recipe, write_recipe

PRUNE = [{"type": "calibrate"}, {"type": "prune_structured", "method": "flap", "ratio": 0.5},
         {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}]
DISTILL = {"type": "distill", "steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 4,
           "targets": ["re:.*encoder\\."]}


def _recipe(bert_dir, distill: dict | None, **extra):
    stages = [*PRUNE, *([distill] if distill else []), {"type": "evaluate"}]
    return text_recipe(bert_dir, "feature-extraction", stages, calibration={"num_samples": 16}, **extra)


def _run(bert_dir, tmp_path, distill, tag, resume=False):
    path = write_recipe(tmp_path, _recipe(bert_dir, distill), f"{tag}.yaml")
    out = run(path, output=tmp_path / tag, resume=resume)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def runs(bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    return _run(bert_dir, tmp, None, "pruned"), _run(bert_dir, tmp, DISTILL, "distilled")


def test_distillation_raises_held_out_cosine_to_the_dense_model(runs):
    (_, pruned), (out, distilled) = runs
    before, after = (m["evaluation"]["comparison"]["mean_cosine"] for m in (pruned, distilled))
    assert after > before
    metrics = distilled["stages"][3]["metrics"]
    assert metrics["loss_last"] < metrics["loss_first"] and metrics["steps"] == 12 and metrics["device"] == "cpu"
    curve = json.loads(next((out / "stages").glob("03-distill")).joinpath("loss.json").read_text())
    assert curve["step"] == list(range(1, 13)) and len(curve["loss"]) == 12
    assert not list((out / "stages").glob("03-distill/checkpoint.pt*"))  # the model/ snapshot replaces it


def test_no_pruned_weight_becomes_non_zero_and_shapes_stay(runs):
    (pruned_dir, _), (distilled_dir, _) = runs
    a, _ = load_checkpoint(pruned_dir / "checkpoint")
    b, _ = load_checkpoint(distilled_dir / "checkpoint")
    changed = 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.shape == q.shape, name
        if p.dim() == 2 and name.startswith("encoder."):
            assert torch.equal(p == 0, q == 0), name
            changed += int(not torch.equal(p, q))
            if ".attention." in name or "dense" in name:
                assert (q.reshape(q.shape[0], -1, 4) != 0).sum(-1).max() <= 2, name  # still 2:4
    assert changed > 0


def _interrupted_run(bert_dir, tmp_path, monkeypatch, tag: str, at_step: int) -> None:
    """Run DISTILL and stop it (as a Ctrl-C would) right after step ``at_step``."""
    real = stages.distill.distill

    def interrupted(model, params, loss, samples, settings, state, on_step):
        def stop(s):
            on_step(s)
            if s.step == at_step:
                raise KeyboardInterrupt
        return real(model, params, loss, samples, settings, state, stop)
    monkeypatch.setattr(stages.distill, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(bert_dir, tmp_path, DISTILL, tag)
    monkeypatch.setattr(stages.distill, "distill", real)


def test_resume_continues_from_the_last_saved_step(bert_dir, tmp_path, monkeypatch, runs):
    _interrupted_run(bert_dir, tmp_path, monkeypatch, "r", at_step=6)
    out, m = _run(bert_dir, tmp_path, DISTILL, "r", resume=True)
    assert [s["status"] for s in m["stages"]] == ["resumed", "resumed", "resumed", "ran", "ran"]
    assert m["stages"][3]["metrics"]["resumed_at_step"] == 4  # checkpoints every 4 steps
    (ref_dir, ref) = runs[1]
    assert m["stages"][3]["metrics"]["loss_last"] == pytest.approx(ref["stages"][3]["metrics"]["loss_last"], rel=1e-4)
    a, _ = load_checkpoint(ref_dir / "checkpoint")
    b, _ = load_checkpoint(out / "checkpoint")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_changed_recipe_does_not_continue_a_stale_checkpoint(bert_dir, tmp_path, monkeypatch):
    _interrupted_run(bert_dir, tmp_path, monkeypatch, "s", at_step=5)
    _, m = _run(bert_dir, tmp_path, {**DISTILL, "lr": 5e-4}, "s", resume=True)
    assert m["stages"][3]["status"] == "ran" and m["stages"][3]["metrics"]["resumed_at_step"] == 0


@pytest.mark.parametrize("kw, field, words", [
    ({"lr": 0}, "stages[3].lr", "greater than 0"),
    ({"steps": 0}, "stages[3].steps", "greater than or equal to 1"),
    ({"steps": 4, "warmup_steps": 4}, "stages[3]", "warmup_steps (4) must be fewer than steps (4)"),
    ({"optimizer": "sgd"}, "stages[3].optimizer", "'sgd' is not allowed"),
    ({"device": "tpu"}, "stages[3].device", "'tpu' is not allowed"),
    ({"momentum": 0.9}, "stages[3].momentum", "unknown key"),
])
def test_bad_arguments_are_one_recipe_error_naming_the_field(bert_dir, kw, field, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_recipe(bert_dir, {**DISTILL, **kw}))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_targets_that_match_no_parameter_and_missing_cuda_fail_the_plan(bert_dir, monkeypatch):
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(_recipe(bert_dir, {**DISTILL, "targets": ["re:nothing"]})))
    assert e.value.field == "stages[3].targets"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(_recipe(bert_dir, {**DISTILL, "device": "cuda"})))
    assert e.value.field == "stages[3].device" and "no CUDA GPU" in e.value.message


def test_distill_needs_calibration_data_and_comes_before_export(bert_dir):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_recipe(bert_dir, "feature-extraction", [DISTILL]))
    assert e.value.field == "stages[0]" and "needs calibration data" in e.value.message
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, {"type": "export"}, DISTILL]))
    assert e.value.field == "stages[2]" and "after it was exported" in e.value.message
