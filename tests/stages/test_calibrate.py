"""The calibrate stage's gradients (GBLM) are a function of the recipe, not of what ran before, nor of
how many samples one backward pass takes."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from calibration.collectors import GradientHooks
from calibration.spec import CalibrationSpec
from models.spec import ModelSpec
from pipeline.runner import run
from stages.calibrate import _backward_rows, _grad_mode, collect_gradients, linears
from tasks import TASKS, load_checkpoint

from ..conftest import text_recipe, write_recipe

GBLM = {"type": "prune_weights", "method": "gblm", "sparsity": 0.5}


def _masks(bert_dir, tmp_path, monkeypatch, tag: str, seed: int = 0) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / f"cache-{tag}"))  # no cached gradients
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, GBLM], calibration={"seed": seed})
    out = run(write_recipe(tmp_path, recipe, f"{tag}.yaml"), output=tmp_path / tag)
    model, _ = load_checkpoint(out / "checkpoint")
    return {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}


def test_simcse_dropout_is_seeded_by_the_recipe(bert_dir, tmp_path, monkeypatch):
    """SimCSE's two views come from dropout: with the global generator moved on between two runs of
    the same recipe the masks stay equal, and the recipe's seed is what changes them."""
    first = _masks(bert_dir, tmp_path, monkeypatch, "a")
    torch.rand(12_345)  # another user of the global generator
    again = _masks(bert_dir, tmp_path, monkeypatch, "b")
    assert all(torch.equal(first[n], again[n]) for n in first)
    other = _masks(bert_dir, tmp_path, monkeypatch, "c", seed=1)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def _gradient_context(model, folder, task: str, num_samples: int, batch_size: int):
    from core.events import Events
    from models.adapters import adapter_for

    spec = ModelSpec(source=str(folder), task=task)
    calibration = CalibrationSpec(num_samples=num_samples, seq_len=12, batch_size=batch_size)
    batches = TASKS[task].calibration_batches(TASKS[task].preprocessor(folder), calibration)
    return SimpleNamespace(model=model, adapter=adapter_for(model.config.model_type, task), task=TASKS[task], calibration=batches,
                           device=torch.device("cpu"), events=Events(None),
                           recipe=SimpleNamespace(model=spec, calibration=calibration))


def test_gradients_one_sample_at_a_time_equal_whole_batch_backward(llama_dir):
    """Backward one sample at a time (autograd keeps one sample's activations and logits) gives the
    sums the whole-batch backward gave, to fp32 rounding: the limit ends inside the second batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ctx = _gradient_context(model, llama_dir, "causal-lm", num_samples=6, batch_size=4)
    modules = {n: mod for block in linears(model, ctx.adapter).values() for n, mod in block.items()}
    got = collect_gradients(ctx, modules, limit=5)

    hooks = GradientHooks(modules)  # the former path: each batch's samples backward together
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
    with _grad_mode(model, train=False, seed=0):
        for batch, take in zip(ctx.calibration, (4, 1)):
            ctx.task.gradient_loss(model, ctx.recipe.model, {"input_ids": batch.inputs["input_ids"][:take]},
                                   None).backward()
    handle.remove()
    expected = hooks.remove()
    assert sorted(got) == sorted(modules) and all(int(got[n]["grad_samples"]) == 5 for n in got)
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was accumulated
    for n in modules:
        for key in ("grad_sum_sq", "grad_sum_abs"):
            assert got[n][key].abs().sum() > 0
            torch.testing.assert_close(got[n][key], expected[n][key], rtol=1e-5, atol=1e-12)


def test_a_loss_that_couples_samples_backwards_whole_batches():
    assert _backward_rows(3, coupled=True) == [slice(0, 3)]
    assert _backward_rows(3, coupled=False) == [slice(0, 1), slice(1, 2), slice(2, 3)]
