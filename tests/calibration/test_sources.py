"""Data sources: built-in text, files, `datasets`, image folders, the Lee benchmark and its reader."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from calibration.sources import LEE, LEE_FILES, lee_benchmark, load_images, load_text, paragraphs, read_lee
from calibration.spec import CalibrationSpec
from core.errors import RecipeError
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


def test_lee_benchmark_is_installed_with_the_package():
    """`make` fetches it (calibration/data/lee/README.md); without it this fails instead of skipping."""
    sums = dict(reversed(line.split()) for line in (LEE / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(LEE_FILES)
    for name, digest in sums.items():
        assert hashlib.sha256((LEE / name).read_bytes()).hexdigest() == digest, name
    lee = lee_benchmark()
    ratings = np.array(lee.similarity)
    assert len(lee.documents) == 50 and ratings.shape == (50, 50)
    assert (np.diag(ratings) == 1).all() and (np.tril(ratings, -1) == 0).all()
    upper = ratings[np.triu_indices(50, 1)]
    assert len(upper) == 1225 and upper.min() == 0.2 and upper.max() == 1.0 and len(np.unique(upper)) == 67
    assert round(float(upper.mean()), 6) == 0.326505
    assert lee.documents[0].startswith("The national executive of the strife-torn Democrats")
    assert sum("£" in d for d in lee.documents) == 1  # the one Latin-1 byte, decoded


def test_missing_lee_files_name_the_recipe_field(tmp_path):
    (tmp_path / "lee.cor").write_text("x")
    with pytest.raises(RecipeError, match="similarities0-1.txt missing") as e:
        lee_benchmark(tmp_path)
    assert e.value.field == "evaluation.lee" and "lee.cor" not in e.value.message.split("missing")[0]
