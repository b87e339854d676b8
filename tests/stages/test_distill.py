"""The distill stage on a tiny BERT pruned by FLAP 50% and Wanda 2:4: held-out fidelity goes up, no
pruned weight comes back, --resume continues from the saved step, the loss curve is drawn, block
outputs add their term, a teacher cached on disk trains like the live one (and is released), and
bad arguments name their field."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import stages.distill
from core.errors import RecipeError
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from tasks import load_checkpoint

from ..conftest import VOCAB, text_recipe, write_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PRUNE = [{"type": "calibrate"}, {"type": "prune_structured", "method": "flap", "ratio": 0.5},
         {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}]
DISTILL = {"type": "distill", "steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 4,
           "targets": ["re:.*encoder\\."]}


LAYERS = {**DISTILL, "layer_loss": 1.0}
CACHED = {**LAYERS, "teacher_cache": True}


def _recipe(bert_dir, distill: dict | None, evaluate=True, **extra):
    stages = [*PRUNE, *([distill] if distill else []), *([{"type": "evaluate"}] if evaluate else [])]
    return text_recipe(bert_dir, "feature-extraction", stages, calibration={"num_samples": 16}, **extra)


def _run(bert_dir, tmp_path, distill, tag, resume=False, evaluate=True):
    path = write_recipe(tmp_path, _recipe(bert_dir, distill, evaluate), f"{tag}.yaml")
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
    curve = json.loads((out / "stages" / "03-distill" / "loss.json").read_text())
    assert curve["step"] == list(range(1, 13)) and len(curve["loss"]) == 12
    assert not list((out / "stages").glob("03-distill/checkpoint.pt*"))  # the model/ snapshot replaces it
    assert metrics["teacher"] == "live"


def test_the_loss_curve_is_a_png_the_report_shows(runs):
    out, m = runs[1]
    png = out / "stages" / "03-distill" / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert m["stages"][3]["metrics"]["plots"] == {"distillation loss": "stages/03-distill/loss.png"}
    assert "![distillation loss](stages/03-distill/loss.png)" in (out / "report.md").read_text()


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


def _interrupted_run(bert_dir, tmp_path, monkeypatch, tag: str, at_step: int, distill_args=DISTILL) -> None:
    """Run ``distill_args`` and stop it (as a Ctrl-C would) right after step ``at_step``."""
    real = stages.distill.distill

    def interrupted(model, params, loss, samples, settings, state, on_step):
        def stop(s):
            on_step(s)
            if s.step == at_step:
                raise KeyboardInterrupt
        return real(model, params, loss, samples, settings, state, stop)
    monkeypatch.setattr(stages.distill, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(bert_dir, tmp_path, distill_args, tag)
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
    ({"device": "cuda"}, "stages[3]", "the device is the run's, set once for every stage: the recipe's top-level"),
    ({"momentum": 0.9}, "stages[3].momentum", "unknown key"),
    ({"layer_loss": -1}, "stages[3].layer_loss", "greater than or equal to 0"),
    ({"layers": []}, "stages[3].layers", "non-empty list of distinct block indices"),
    ({"layers": [0, 0]}, "stages[3].layers", "non-empty list of distinct block indices"),
    ({"teacher_cache_max_gb": 0}, "stages[3].teacher_cache_max_gb", "greater than 0"),
])
def test_bad_arguments_are_one_recipe_error_naming_the_field(bert_dir, kw, field, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_recipe(bert_dir, {**DISTILL, **kw}))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_targets_that_match_no_parameter_and_blocks_that_do_not_exist_fail_the_plan(bert_dir):
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(_recipe(bert_dir, {**DISTILL, "targets": ["re:nothing"]})))
    assert e.value.field == "stages[3].targets"
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(_recipe(bert_dir, {**LAYERS, "layers": [0, 2]})))
    assert e.value.field == "stages[3].layers" and "[2] do not exist: this model has 2 blocks" in e.value.message


def test_distill_needs_calibration_data_and_comes_before_export(bert_dir):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_recipe(bert_dir, "feature-extraction", [DISTILL]))
    assert e.value.field == "stages[0]" and "needs calibration data" in e.value.message
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, {"type": "export"}, DISTILL]))
    assert e.value.field == "stages[2]" and "after it was exported" in e.value.message


# Intermediate layers and the teacher cache


@pytest.fixture(scope="module")
def layer_runs(bert_dir, tmp_path_factory):
    """DISTILL with layer_loss 1 against the live teacher, and again from the teacher cache; the cached
    run records, as training starts, whether the teacher it loaded is still alive and what it trains on."""
    tmp = tmp_path_factory.mktemp("distill_layers")
    live = _run(bert_dir, tmp, LAYERS, "live", evaluate=False)
    seen: dict = {}
    load, train = stages.distill.load_model, stages.distill.distill

    def loading(*a, **kw):
        model, pre = load(*a, **kw)
        seen["teacher"] = weakref.ref(model)
        return model, pre

    def training(model, params, loss, samples, *rest):
        gc.collect()
        seen["alive"] = seen["teacher"]() is not None
        seen["samples"] = {k: (v.dtype, tuple(v.shape)) for k, v in samples.items()}
        seen["files"] = sorted(p.name for p in (tmp / ".cached.partial").glob("stages/03-distill/teacher/*"))
        return train(model, params, loss, samples, *rest)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.distill, "load_model", loading)
        mp.setattr(stages.distill, "distill", training)
        cached = _run(bert_dir, tmp, CACHED, "cached", evaluate=False)
    return live, cached, seen


def test_layer_loss_adds_the_block_output_error(runs, layer_runs):
    plain = runs[1][1]["stages"][3]["metrics"]
    layered = layer_runs[0][1]["stages"][3]["metrics"]
    # the same student and first batch: the block-output term adds to the output loss (here 7e-5 -> 1e-4)
    assert layered["loss_first"] > 1.2 * plain["loss_first"]
    assert layered["loss_last"] < layered["loss_first"]


def test_the_cached_teacher_trains_like_the_live_one_and_is_released(layer_runs):
    (live_dir, live), (cached_dir, cached), seen = layer_runs
    a, b = (m["stages"][3]["metrics"] for m in (live, cached))
    assert a["teacher"] == "live" and b["teacher"] == "cache" and b["teacher_cache_reused"] is False
    curve_a, curve_b = (json.loads((d / "stages/03-distill/loss.json").read_text())["loss"] for d in (live_dir, cached_dir))
    # float16 targets: rounding adds ~4e-8 to each squared-error term of this model, and the two runs
    # drift apart by under 1e-6 in 12 steps, against losses of 4e-5 to 2e-4 (the wrong rows would give ~1)
    assert curve_b == pytest.approx(curve_a, rel=1e-2, abs=1e-6)
    assert seen["alive"] is False  # no reference to the teacher survives the cache
    half = torch.float16
    assert seen["samples"]["output.0"] == (half, (16, 32)) and seen["samples"]["output.1"] == (half, (16, 16, 32))
    assert seen["samples"]["block.0"] == (half, (16, 16, 32)) and seen["samples"]["block.1"] == (half, (16, 16, 32))
    assert seen["files"] == ["block.0.npy", "block.1.npy", "index.json", "output.0.npy", "output.1.npy"]
    assert not (cached_dir / "stages/03-distill/teacher").exists()  # deleted with the checkpoint
    assert b["teacher_cache_mb"] == pytest.approx(16 * (32 + 3 * 16 * 32) * 2 / 1e6, abs=0.01)


def test_resume_reuses_a_complete_teacher_cache(bert_dir, tmp_path, monkeypatch, layer_runs):
    _interrupted_run(bert_dir, tmp_path, monkeypatch, "r", at_step=6, distill_args=CACHED)
    monkeypatch.setattr(stages.distill, "load_model", lambda *a, **kw: pytest.fail("the teacher was loaded again"))
    _, m = _run(bert_dir, tmp_path, CACHED, "r", resume=True)
    metrics = m["stages"][3]["metrics"]
    assert metrics["resumed_at_step"] == 4 and metrics["teacher_cache_reused"] is True
    ref = layer_runs[1][1]["stages"][3]["metrics"]
    assert metrics["loss_last"] == pytest.approx(ref["loss_last"], rel=1e-4)


def test_a_causal_lm_trains_from_cached_float16_logits_like_the_live_teacher(llama_dir, tmp_path):
    losses = []
    for cache in (False, True):
        stages_ = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"},
                   {"type": "distill", "steps": 4, "batch_size": 4, "lr": 1e-3, "teacher_cache": cache}]
        path = write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages_), f"{cache}.yaml")
        out = run(path, output=tmp_path / str(cache))
        losses.append(json.loads((out / "stages/02-distill/loss.json").read_text())["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=2e-3) and losses[0][-1] < losses[0][0]


def test_a_teacher_cache_above_the_bound_is_refused_before_anything_is_written(llama_dir, tmp_path):
    stages_ = [{"type": "calibrate"}, {"type": "distill", "steps": 2, "teacher_cache": True,
                                       "teacher_cache_max_gb": 0.001}]
    path = write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages_))
    with pytest.raises(RecipeError) as e:
        run(path, output=tmp_path / "big")
    gb = 8 * 16 * VOCAB * 2 / 1e9  # 8 windows of 16 tokens, full-vocabulary logits in float16
    assert e.value.field == "stages[1].teacher_cache_max_gb"
    assert f"would take {gb:.3g} GB" in e.value.message and "calibration.num_samples" in e.value.message
    assert not list(tmp_path.rglob("*.npy"))


def test_block_outputs_of_different_shapes_are_refused_naming_the_field():
    with pytest.raises(RecipeError) as e:
        stages.distill.layer_term({1: torch.zeros(2, 5, 24)}, {1: torch.zeros(2, 5, 32)}, None, "stages[3].layer_loss")
    assert e.value.field == "stages[3].layer_loss" and "(2, 5, 24)" in e.value.message and "(2, 5, 32)" in e.value.message


def test_a_teacher_output_beyond_float16_is_refused():
    with pytest.raises(RecipeError) as e:
        stages.distill._half(torch.tensor([1.0, 7e4]), "stages[3].teacher_cache")
    assert e.value.field == "stages[3].teacher_cache" and "7e+04" in e.value.message
    assert stages.distill._half(torch.tensor([1.0, 6e4]), "f").dtype.name == "float16"
