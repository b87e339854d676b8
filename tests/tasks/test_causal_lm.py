"""causal-lm: token windows, the deployed logits, GBLM's loss and the perplexity ratio."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibration.batches import Batch, Batches
from calibration.sources import load_text
from calibration.spec import CalibrationSpec
from evaluation.spec import EvaluationSpec
from models.spec import ModelSpec
from tasks import TASKS, HeldOut

TASK = TASKS["causal-lm"]


@pytest.fixture(scope="module")
def llama(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert TASK.auto_class("llama") is AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


def test_calibration_windows_are_seeded_slices_of_the_stream(llama):
    _, tok = llama
    spec = CalibrationSpec(num_samples=5, seq_len=12, batch_size=2, seed=1)
    batches = TASK.calibration_batches(tok, spec)
    assert [b.inputs["input_ids"].shape for b in batches] == [(2, 12), (2, 12), (1, 12)]
    assert batches.protocol["kind"] == "random windows" and batches.origin == "builtin:austen_northangerabbey.txt"
    stream = tok(load_text(spec, "calibration", "calibration").text, add_special_tokens=False)["input_ids"]
    first = batches.batches[0].inputs["input_ids"][0].tolist()
    assert any(stream[s:s + 12] == first for s in range(len(stream) - 12))


def test_evaluation_takes_the_first_windows_whole_batches_only(llama):
    _, tok = llama
    batches = TASK.evaluation_batches(tok, EvaluationSpec(num_samples=5), batch_size=2, seq_len=8)
    ids = torch.cat([b.inputs["input_ids"] for b in batches])
    stream = tok(load_text(EvaluationSpec(), "evaluation", "evaluation").text, add_special_tokens=False)["input_ids"]
    assert ids.shape == (4, 8) and ids.flatten().tolist() == stream[:32]
    assert batches.protocol == {"kind": "first non-overlapping windows", "windows": 4, "seq_len": 8, "offset": 0,
                                "stream_tokens": len(stream), "special_tokens": False}


def test_forward_is_the_logits_and_the_loss_sums_window_means(llama):
    model, _ = llama
    spec = ModelSpec(source="x", task="causal-lm")
    ids = torch.randint(0, 1000, (3, 9))
    logits = model(input_ids=ids).logits
    (out,) = TASK.forward(model, {"input_ids": ids}, spec)
    torch.testing.assert_close(out, logits)
    per_window = [F.cross_entropy(logits[i, :-1], ids[i, 1:]) for i in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(TASK.gradient_loss(model, spec, {"input_ids": ids}, None), sum(per_window))


def test_quality_is_the_perplexity_ratio():
    ids = torch.tensor([[0, 1, 2, 3]])
    held = HeldOut(Batches([Batch({"input_ids": ids})], "x"), None, 1, 4, lee=False)
    uniform = lambda b: [torch.zeros(1, 4, 8).numpy()]  # noqa: E731 (perplexity 8)
    sharp = lambda b: [F.one_hot(torch.tensor([[1, 2, 3, 0]]), 8).float().mul(4).numpy()]  # noqa: E731
    q = TASK.quality(uniform, sharp, held)
    assert q["dense"]["perplexity"] == pytest.approx(8.0)
    assert q["comparison"]["perplexity_ratio"] == round(q["compressed"]["perplexity"] / 8.0, 4) < 1


def test_quality_and_quantized_fidelity_count_top1_next_token_agreement():
    ids = torch.tensor([[0, 1, 2, 3]])
    sharp = F.one_hot(torch.tensor([[1, 2, 3, 0]]), 8).float().mul(4).numpy()
    half = F.one_hot(torch.tensor([[1, 5, 3, 0]]), 8).float().mul(4).numpy()  # the 2nd of 3 predictions differs
    held = HeldOut(Batches([Batch({"input_ids": ids})], "x"), None, 1, 4, lee=False)
    q = TASK.quality(lambda b: [sharp], lambda b: [half], held)
    assert q["comparison"]["token_agreement"] == round(2 / 3, 4)
    f = TASK.quantized_fidelity([({"input_ids": ids}, [sharp], [half])])
    assert f["token_agreement"] == round(2 / 3, 4) and f["float_perplexity"] == q["dense"]["perplexity"]
    assert f["perplexity_ratio"] == q["comparison"]["perplexity_ratio"] > 1
    assert f["quantized_perplexity"] == q["compressed"]["perplexity"]
