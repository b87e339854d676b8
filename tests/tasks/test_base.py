"""The shared task behaviour: data modality checks, pooling and the embedding outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from calibration.spec import CalibrationSpec
from core.errors import RecipeError
from evaluation.spec import EvaluationSpec
from models.spec import ModelSpec
from tasks import TASKS
from tasks.base import embedding_outputs, pool


@pytest.mark.parametrize("task, source, needs", [
    ("causal-lm", "images", "needs text: use source 'builtin', 'files' or 'datasets'"),
    ("image-classification", "builtin", "needs images: set source 'images' with a folder path, or 'datasets'"),
    ("image-feature-extraction", "files", "needs images"),
])
def test_source_of_the_wrong_modality_names_the_field(task, source, needs, tmp_path):
    spec = CalibrationSpec(source=source, path=None if source == "builtin" else str(tmp_path))
    with pytest.raises(RecipeError) as e:
        TASKS[task].check_data(spec, "calibration")
    assert e.value.field == "calibration.source" and needs in e.value.message and repr(task) in e.value.message


def test_paths_are_checked_and_datasets_give_either(tmp_path, images_dir):
    with pytest.raises(RecipeError, match="no such file or folder") as e:
        TASKS["causal-lm"].check_data(EvaluationSpec(source="files", path=str(tmp_path / "x")), "evaluation")
    assert e.value.field == "evaluation.path"
    with pytest.raises(RecipeError, match="has no images"):
        TASKS["image-classification"].check_data(CalibrationSpec(source="images", path=str(tmp_path)), "calibration")
    TASKS["image-classification"].check_data(CalibrationSpec(source="images", path=str(images_dir)), "calibration")
    (tmp_path / "d.txt").write_text("a line of text\n")
    for task in TASKS.values():  # datasets give either modality: the column decides
        task.check_data(CalibrationSpec(source="datasets", dataset={"name": "text", "data_files": str(tmp_path / "d.txt")}),
                        "calibration")


def test_pool_mean_ignores_padding_and_cls_takes_the_first_token():
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_embedding_prefers_a_projection_and_normalizes_on_request():
    hidden = torch.randn(2, 3, 4)
    projected = torch.randn(2, 5)

    def model(**kw):
        return SimpleNamespace(last_hidden_state=hidden, image_embeds=projected)

    spec = ModelSpec(source="x", task="image-feature-extraction")
    emb, out_hidden = embedding_outputs(model, {"pixel_values": torch.zeros(2)}, spec)
    torch.testing.assert_close(emb, projected / projected.norm(dim=-1, keepdim=True))
    assert out_hidden is hidden
    raw = embedding_outputs(lambda **kw: SimpleNamespace(last_hidden_state=hidden), {},
                            spec.model_copy(update={"normalize": False, "pooling": "cls"}))[0]
    torch.testing.assert_close(raw, hidden[:, 0])


@pytest.mark.parametrize("task, field, ok", [
    ("causal-lm", "max_perplexity_ratio", True), ("causal-lm", "min_token_agreement", True),
    ("causal-lm", "min_mean_cosine", False), ("feature-extraction", "min_mean_cosine", True),
    ("feature-extraction", "min_top1_retained", False), ("image-feature-extraction", "min_min_cosine", True),
    ("image-classification", "min_top1_retained", True), ("image-classification", "max_perplexity_ratio", False),
])
def test_each_gate_field_is_valid_only_for_tasks_with_its_metric(task, field, ok, images_dir):
    data = {"source": "images", "path": str(images_dir)} if TASKS[task].modality == "images" else {}
    spec = EvaluationSpec(lee=False, accept={field: 0.9 if field.startswith("min_") else 1.1}, **data)
    if ok:
        TASKS[task].check_evaluation(spec)
        return
    with pytest.raises(RecipeError) as e:
        TASKS[task].check_evaluation(spec)
    assert e.value.field == f"evaluation.accept.{field}"
    assert e.value.message.startswith(f"task {task!r} has no metric for {field} (its gate fields: ")


def test_only_causal_lm_replaces_the_logits_parity_for_quantized_graphs():
    assert {n for n, t in TASKS.items() if t.quantized_bounds} == {"causal-lm"}
    assert TASKS["feature-extraction"].quantized_fidelity([]) is None


def test_logits_kl_is_the_softened_kl_times_t_squared():
    from tasks.base import logits_kl

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert torch.allclose(logits_kl(s, t, 2.0), expected, atol=1e-6)
    assert float(logits_kl(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_embedding_distill_is_cosine_plus_mse_and_ignores_padding():
    from tasks.base import embedding_distill

    emb, hid = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 3, 2)
    assert float(embedding_distill((emb, hid), (emb, hid), None)) == 0.0
    other = torch.tensor([[0.0, 1.0]])
    assert float(embedding_distill((other, hid), (emb, hid), None)) == pytest.approx(1.0 + 1.0)
    padded = hid.clone()
    padded[0, 2] = 5.0  # a padding position: the mask drops it
    mask = torch.tensor([[1, 1, 0]])
    assert float(embedding_distill((emb, padded), (emb, hid), mask)) == 0.0
    assert float(embedding_distill((emb, padded), (emb, hid), None)) == pytest.approx(25.0 / 3)
