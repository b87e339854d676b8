"""Data sources: built-in text, files, `datasets`, image folders, the Lee benchmark reader."""

from __future__ import annotations

import pytest

from calibration.sources import load_images, load_text, paragraphs, read_lee
from core.errors import RecipeError
from calibration.spec import CalibrationSpec
from evaluation.spec import EvaluationSpec


def test_builtin_calibration_and_evaluation_texts_differ():
    cal = load_text(CalibrationSpec(), "calibration", "calibration")
    ev = load_text(EvaluationSpec(), "evaluation", "evaluation")
    assert cal.origin == "builtin:austen_northangerabbey.txt" and ev.origin == "builtin:austen_prideprejudice.txt"
    assert "Catherine Morland" in cal.text and "Elizabeth Bennet" in ev.text
    assert not set(paragraphs(cal.text, 20)) & set(paragraphs(ev.text, 20))


def test_paragraphs_collapse_whitespace_and_drop_short_ones():
    text = "Chapter 1\n\nIt is a truth universally\nacknowledged, that a single man\n\n\nShort one."
    assert paragraphs(text) == ["It is a truth universally acknowledged, that a single man"]


def test_files_source(tmp_path):
    (tmp_path / "a.txt").write_text("first file text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second file text")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    data = load_text(CalibrationSpec(source="files", path=str(tmp_path)), "calibration", "calibration")
    assert data.text == "first file text\n\nsecond file text" and "2 files" in data.origin
    with pytest.raises(RecipeError, match="no such file or folder"):
        load_text(CalibrationSpec(source="files", path=str(tmp_path / "x")), "calibration", "calibration")


def test_datasets_source_with_local_files(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "d.txt").write_text("line one of the dataset\nline two of the dataset\n")
    spec = CalibrationSpec(source="datasets", dataset={"name": "text", "data_files": str(tmp_path / "d.txt")})
    data = load_text(spec, "calibration", "calibration")
    assert data.text == "line one of the dataset\n\nline two of the dataset"
    bad = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"column": "body"})})
    with pytest.raises(RecipeError) as e:
        load_text(bad, "calibration", "calibration")
    assert e.value.field == "calibration.dataset.column" and "columns: text" in e.value.message


def test_image_folder_labels_from_subfolders(images_dir):
    data = load_images(CalibrationSpec(source="images", path=str(images_dir)), "calibration")
    assert data.classes == ["checks", "gradient", "stripes"] and len(data.images) == 18
    assert sorted(set(data.labels)) == [0, 1, 2] and data.images[0].mode == "RGB"


def test_lee_reader(tmp_path):
    corpus, ratings = tmp_path / "lee.cor", tmp_path / "sim.txt"
    corpus.write_bytes("first doc\nsecond \xa3 doc\nthird".encode("latin-1"))
    ratings.write_text("1\t0.5\t0.25\n0\t1\t0.75\n0\t0\t1\n")
    lee = read_lee(corpus, ratings)
    assert lee.documents[1] == "second £ doc" and lee.similarity[1][2] == 0.75
    ratings.write_text("1\t0.5\n0\t1\n")
    with pytest.raises(ValueError, match="disagree"):
        read_lee(corpus, ratings)
