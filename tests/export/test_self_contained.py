"""A pulled artifact prepares its graph's inputs on its own, whatever the task: the text model's tokenizer
or the vision model's image processor comes back in preprocessor/ and behaves as the source model's;
report.md's figures come with it, so its links resolve where it is pulled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from export.registry import pull, push
from pipeline.runner import run

from ..conftest import write_recipe

SENTENCES = ["The device tokenizes this sentence alone.", "Ünïcode, digits 1999 and [brackets]!"]


def _round_trip(run_dir: Path, tmp_path: Path) -> Path:
    push(run_dir, f"{tmp_path}/registry/run:v1")
    pull(f"{tmp_path}/registry/run:v1", tmp_path / "pulled")
    return tmp_path / "pulled"


def test_a_text_run_pulls_its_tokenizer(deploy_run, bert_dir, tmp_path):
    from transformers import AutoTokenizer

    pulled = _round_trip(deploy_run, tmp_path)
    assert json.loads((pulled / "manifest.json").read_text())["onnx"]["preprocessor"] == "preprocessor"
    source, shipped = AutoTokenizer.from_pretrained(bert_dir), AutoTokenizer.from_pretrained(pulled / "preprocessor")
    kw = {"padding": "max_length", "truncation": True, "max_length": 16}
    assert shipped(SENTENCES, **kw) == source(SENTENCES, **kw)
    assert shipped(SENTENCES)["input_ids"] != shipped(SENTENCES[::-1])["input_ids"]  # the sentences differ


def test_report_links_resolve_in_the_pulled_folder(deploy_run, tmp_path):
    pulled = _round_trip(deploy_run, tmp_path)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (pulled / "report.md").read_text())
    assert "stages/01-prune_weights/sparsity_per_layer.png" in links
    for link in links:
        assert (pulled / link).read_bytes() == (deploy_run / link).read_bytes(), link
        assert (pulled / link).read_bytes().startswith(b"\x89PNG"), link


def test_a_vision_run_pulls_its_image_processor(vit_dir, images_dir, tmp_path):
    from transformers import AutoImageProcessor

    images = {"source": "images", "path": str(images_dir)}
    recipe = {"name": "vit", "model": {"source": str(vit_dir), "task": "image-classification"},
              "calibration": {**images, "num_samples": 4, "batch_size": 2}, "stages": [{"type": "export"}],
              "export": {"batch_size": 2}}
    pulled = _round_trip(run(write_recipe(tmp_path, recipe), output=tmp_path / "vit"), tmp_path)
    assert sorted(p.name for p in (pulled / "preprocessor").iterdir()) == ["preprocessor_config.json"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    source, shipped = AutoImageProcessor.from_pretrained(vit_dir), AutoImageProcessor.from_pretrained(pulled / "preprocessor")
    pixels = shipped(image, return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(pixels, source(image, return_tensors="np")["pixel_values"])
