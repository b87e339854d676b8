"""Batch primitives: token windows, paragraphs, padded texts, and their errors naming the field."""

from __future__ import annotations

import pytest
import torch

from calibration.batches import encode_texts, first_windows, held_out_paragraphs, random_paragraphs, random_windows
from calibration.sources import TextData
from calibration.spec import CalibrationSpec
from core.errors import RecipeError


@pytest.fixture(scope="module")
def tok(bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert_dir)


def _text(words: int, paragraphs: int = 1) -> TextData:
    return TextData("\n\n".join(" ".join(f"w{p}x{i}" for i in range(words)) for p in range(paragraphs)), "test")


def test_random_windows_are_seeded_and_too_short_text_names_the_field(tok):
    text = TextData(" ".join(["river", "stone", "tree"] * 40), "test")
    spec = CalibrationSpec(num_samples=3, seq_len=8, batch_size=2, seed=5)
    a, b = random_windows(tok, text, spec, "calibration"), random_windows(tok, text, spec, "calibration")
    assert a.sha256 == b.sha256 and [x.size for x in a] == [2, 1] and a.protocol["stream_tokens"] == 120
    with pytest.raises(RecipeError, match="fewer than seq_len=200") as e:
        random_windows(tok, text, spec.model_copy(update={"seq_len": 200}), "calibration")
    assert e.value.field == "calibration.seq_len"


def test_first_windows_need_one_whole_batch(tok):
    text = TextData(" ".join(["river"] * 30), "test")
    got = first_windows(tok, text, num_samples=10, batch_size=2, seq_len=7, field="evaluation")
    assert torch.cat([b.inputs["input_ids"] for b in got]).shape == (4, 7)  # 29 // 7 = 4 windows
    with pytest.raises(RecipeError, match="not one batch of 5 x 7-token windows") as e:
        first_windows(tok, text, num_samples=10, batch_size=5, seq_len=7, field="evaluation")
    assert e.value.field == "evaluation.num_samples"


def test_paragraphs_need_enough_words(tok):
    spec = CalibrationSpec(num_samples=4, seq_len=16, batch_size=4)
    with pytest.raises(RecipeError, match="no paragraph of 8 words") as e:
        random_paragraphs(tok, _text(5, 3), spec, "calibration")
    assert e.value.field == "calibration.path"
    got = held_out_paragraphs(tok, _text(25, 5), num_samples=5, seed=0, batch_size=2, seq_len=16, field="evaluation")
    assert [b.size for b in got] == [2, 2] and got.protocol["paragraphs"] == 4
    with pytest.raises(RecipeError, match="20\\+ words"):
        held_out_paragraphs(tok, _text(12, 5), num_samples=5, seed=0, batch_size=2, seq_len=16, field="evaluation")


def test_encode_texts_pads_the_last_batch_with_empty_texts(tok):
    batches = encode_texts(tok, ["one", "two words", "three little words"], batch_size=2, seq_len=6)
    assert [b.inputs["input_ids"].shape for b in batches] == [(2, 6), (2, 6)]
    assert batches[1].inputs["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]  # [CLS] [SEP] of ""
