"""The token_prune stage end to end: a static selection exported and checked against PyTorch, resumed,
TRIM's K calibrated against an independent pass and its text graph exported, and recipe errors
naming the field."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from core.errors import RecipeError, StageFailed
from export import onnx as onnx_export
from export import tensorrt
from export import token_graph as graph
from methods.tokens import SELECTORS
from methods.tokens.trim import SIGNS
from methods.tokens.trim_iqr import counts, fixed_k
from models.spec import ModelSpec
from pipeline.recipe import _validate, parse_recipe
from pipeline.runner import plan, run
from stages.token_prune import TokenPrune
from tasks import TASKS

from ..conftest import write_recipe

PATCHES = 16  # the conftest ViT/CLIP: 32x32 images, 8x8 patches


@pytest.fixture(scope="module")
def clip(clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clip_vision(clip):
    return clip.vision_model


def image_recipe(model_dir, images_dir, task, stages, **export):
    return {"name": "t", "model": {"source": str(model_dir), "task": task},
            "calibration": {"source": "images", "path": str(images_dir), "num_samples": 6, "batch_size": 3},
            "stages": stages, "export": {"batch_size": 2, **export},
            "evaluation": {"source": "images", "path": str(images_dir), "num_samples": 6,
                           "latency": {"iterations": 5, "warmup": 1}}}


# Every selector that runs on a plain ViT goes through the export checks; extra fields where its defaults test less.
STAGE_CASES = {name: {} for name, cls in SELECTORS.members().items() if not (cls.calibration_images or cls.text_tower)}
STAGE_CASES |= {"cls_attention": {"fuse": True}, "hiprune": {"alpha": 0.6, "object_layer": 0},
                "visionzip": {"fuse": True, "contextual": 2}}


def test_every_plain_selector_is_exported_below():
    assert {"cls_attention", "divprune", "global_attention", "hiprune"} <= set(STAGE_CASES) <= set(SELECTORS.names())


@pytest.mark.parametrize("method", sorted(STAGE_CASES))
def test_stage_exports_a_static_selection_that_matches_pytorch(vit_dir, images_dir, tmp_path, method):
    extra = STAGE_CASES[method]
    stages = [{"type": "token_prune", "method": method, "layer": 1, "keep": 6, "output": True, **extra},
              {"type": "export"}]
    out = run(write_recipe(tmp_path, image_recipe(vit_dir, images_dir, "image-feature-extraction", stages)),
              output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    tokens = 6 + int(extra.get("fuse", False))
    assert m["onnx"]["outputs"] == [{"name": "image_features", "dtype": "float32", "shape": [2, tokens, 32]},
                                    {"name": "token_index", "dtype": "int64", "shape": [2, 6]}]
    tp = m["onnx"]["token_pruning"]
    assert tp["index_parity"] == "identical" and 6 in tp["topk_k"] and m["onnx"]["tensorrt"]["ok"]
    assert m["onnx"]["parity"]["max_rel_err"] <= 1e-4
    proto = onnx.load(out / "model.onnx")
    assert onnx_export.static_shape_problems(proto) == [] and tensorrt.check(proto, "jetson-orin-jp6").ok
    assert 6 in graph.topk_constants(proto)


def test_stage_inside_vit_resumes_exports_and_evaluates(vit_dir, images_dir, tmp_path):
    stages = [{"type": "token_prune", "method": "cls_attention", "layer": 0, "keep": 0.25, "fuse": True},
              {"type": "export"}, {"type": "evaluate"}]
    recipe = image_recipe(vit_dir, images_dir, "image-classification", stages, rtol=1e-12)
    with pytest.raises(StageFailed):  # export fails; the resumed run must re-install the pruner from the stage
        run(write_recipe(tmp_path, recipe, "strict.yaml"), output=tmp_path / "out")
    recipe["export"]["rtol"] = 1e-4
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out", resume=True)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["resumed", "ran", "ran"]
    metrics = m["stages"][0]["metrics"]
    assert (metrics["keep"], metrics["tokens_out"], metrics["patches"]) == (4, 1 + 4 + 1, PATCHES)
    tp = m["onnx"]["token_pruning"]
    assert tp["topk_k"] == [4] and m["onnx"]["tensorrt"]["ok"]
    assert m["onnx"]["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [2, 3]}]
    assert m["onnx"]["parity"]["max_rel_err"] <= 1e-4
    ev = m["evaluation"]
    assert ev["size"]["compressed"]["flops"] < ev["size"]["dense"]["flops"]
    assert 0 <= ev["comparison"]["top1_agreement"] <= 1 and "top1_accuracy" in ev["compressed"]


def test_stage_trim_calibrates_k_and_exports_the_text_graph(clip_dir, clip, clip_vision, images_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "token_prune", "method": "trim", "layer": -2, "output": True,
                                      "prompt": "a photo of stripes", "text_len": 16, "percentile": 90},
              {"type": "export"}]
    recipe = image_recipe(clip_dir, images_dir, "image-feature-extraction", stages)
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    info = m["stages"][1]["metrics"]["trim"]
    assert info["paper"]["used"] and not info["released_code"]["used"]
    # K from an independent pass: HF hidden states of the calibration images, scored with both signs.
    from calibration.spec import CalibrationSpec
    from models.loading import load_model, resolve_source

    spec = ModelSpec(source=str(clip_dir), task="image-feature-extraction")
    _, processor = load_model(spec, resolve_source(spec), TASKS[spec.task])
    batches = TASKS[spec.task].calibration_batches(processor, CalibrationSpec(**recipe["calibration"]))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(clip_dir)(["a photo of stripes"], padding="max_length", max_length=16,
                                                 return_tensors="pt")["input_ids"]
    with torch.no_grad():
        t = clip.get_text_features(input_ids=ids).pooler_output
        sims = []
        for b in batches:
            f = clip_vision(**b.inputs, output_hidden_states=True).hidden_states[1][:, 1:]  # block 0 = layer -2 of 2
            sims.append((clip.visual_projection(clip.vision_model.post_layernorm(f)) @ t[0]).numpy())
    sim = np.concatenate(sims)
    for name, sign in SIGNS.items():
        per_image = counts(sim, sign)
        assert info[name]["keep"] == fixed_k(per_image, 90, PATCHES)
        assert info[name]["counts"]["mean"] == round(float(np.mean(per_image)), 2)
    k = info["paper"]["keep"]
    onnx_info = m["onnx"]
    assert [i["name"] for i in onnx_info["inputs"]] == ["pixel_values", "text_embeds"]
    assert onnx_info["outputs"][0]["shape"] == [2, k + 1, 32] and onnx_info["outputs"][1]["shape"] == [2, k]
    tp = onnx_info["token_pruning"]
    assert tp["index_parity"] == "identical" and tp["topk_k"] == [k]
    text = tp["companions"][0]
    assert text["path"] == "text_encoder.onnx" and (out / "text_encoder.onnx").is_file()
    assert text["inputs"][0]["shape"] == [2, 16] and text["outputs"][0]["shape"] == [2, 16]
    sess = onnx_export.session(out / "text_encoder.onnx")
    got = sess.run(None, {"input_ids": ids.expand(2, -1).numpy()})[0]
    np.testing.assert_allclose(got[0], t[0].numpy(), atol=1e-5)


def test_stage_cdpruner_exports_k_greedy_steps_with_the_text_input(clip_dir, images_dir, tmp_path):
    stages = [{"type": "token_prune", "method": "cdpruner", "layer": -2, "output": True, "keep": 6,
               "prompt": "a photo of stripes", "text_len": 16}, {"type": "export"}]
    out = run(write_recipe(tmp_path, image_recipe(clip_dir, images_dir, "image-feature-extraction", stages)),
              output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in m["onnx"]["inputs"]] == ["pixel_values", "text_embeds"]
    assert [o["shape"] for o in m["onnx"]["outputs"]] == [[2, 6, 32], [2, 6]]
    tp = m["onnx"]["token_pruning"]
    assert tp["index_parity"] == "identical" and tp["topk_k"] == [6] and m["onnx"]["tensorrt"]["ok"]
    assert m["onnx"]["parity"]["max_rel_err"] <= 1e-4 and tp["companions"][0]["path"] == "text_encoder.onnx"
    proto = onnx.load(out / "model.onnx")
    assert onnx_export.static_shape_problems(proto) == []
    assert sum(n.op_type == "ArgMax" for n in proto.graph.node) == 6  # one per greedy step, unrolled


def test_stage_random_reads_its_indices_from_the_host(vit_dir, images_dir, tmp_path):
    stages = [{"type": "token_prune", "method": "random", "layer": 1, "keep": 5, "output": True, "seed": 2},
              {"type": "export"}]
    out = run(write_recipe(tmp_path, image_recipe(vit_dir, images_dir, "image-feature-extraction", stages)),
              output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert m["onnx"]["inputs"][1] == {"name": "keep_idx", "dtype": "int64", "shape": [2, 5]}
    sess = onnx_export.session(out / "model.onnx")
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    given = np.array([[14, 3, 8, 0, 9], [1, 2, 3, 4, 15]])
    features, idx = sess.run(None, {"pixel_values": x, "keep_idx": given})
    np.testing.assert_array_equal(idx, np.sort(given, axis=-1))
    _, other = sess.run(None, {"pixel_values": x, "keep_idx": given[::-1].copy()})
    np.testing.assert_array_equal(other, np.sort(given[::-1], axis=-1))


def bad(recipe, match, field):
    with pytest.raises(RecipeError, match=match) as e:
        plan(parse_recipe(recipe))
    assert e.value.field == field


@pytest.mark.parametrize("keep, match", [(0, "keeps no token"), (1.5, r"not a ratio in \(0, 1\]"),
                                         (17, "more than the 16 patch tokens"), (0.01, "rounds to 0 tokens"),
                                         (-3, "keeps no token"), ("half", "neither a count"),
                                         (True, "neither a count")])
def test_bad_keep_is_a_recipe_error(vit_dir, images_dir, keep, match):
    stages = [{"type": "token_prune", "method": "cls_attention", "layer": 0, "keep": keep}, {"type": "export"}]
    bad(image_recipe(vit_dir, images_dir, "image-classification", stages), match, "stages[0].keep")


def test_other_recipe_errors(vit_dir, clip_dir, bert_dir, images_dir):
    def tp(**kw):
        return {"type": "token_prune", "method": "cls_attention", "layer": 0, "keep": 4, **kw}

    def vit(*stages):
        return image_recipe(vit_dir, images_dir, "image-classification", list(stages))
    bad(vit(tp(keep=None)), "keep is required", "stages[0].keep")
    bad(vit(tp(layer=2)), "layer 2 does not exist", "stages[0].layer")
    bad(vit(tp(prompt="a cat")), "unknown key", "stages[0].prompt")
    bad(vit(tp(percentile=50)), "unknown key", "stages[0].percentile")
    bad(vit(tp(alpha=0.5)), "unknown key", "stages[0].alpha")
    bad(vit(tp(keep=16, fuse=True)), "nothing to fuse", "stages[0].keep")
    bad(vit(tp(method="hiprune", object_layer=1, layer=0)), "comes after the pruning layer", "stages[0].object_layer")
    bad(vit(tp(method="hiprune", keep=8, alpha=1.0)), "anchors", "stages[0].alpha")
    bad(vit(tp(method="trim", prompt="a cat")), "needs calibration data", "stages[0]")
    bad(vit({"type": "calibrate"}, tp(method="trim", prompt="a cat")), "CLIP vision tower", "stages[1].method")
    bad(vit(tp(method="trim")), "trim needs the text", "stages[0].prompt")
    bad(vit(tp(method="cdpruner", prompt="a cat")), "CLIP vision tower", "stages[0].method")
    bad(vit(tp(method="visionzip", contextual=4)), "leaves no dominant token", "stages[0].contextual")
    bad(vit(tp(method="visionzip", contextual=1.5)), "not a ratio of keep", "stages[0].contextual")
    bad(vit(tp(output=True)), "image-feature-extraction", "stages[0].output")
    bad(vit({"type": "export"}, tp()), "changes the model after it was exported", "stages[1]")
    bad(vit(tp(), {"type": "prune_weights", "method": "magnitude", "sparsity": 0.5}), "comes after token_prune",
        "stages[0]")
    clip = image_recipe(clip_dir, images_dir, "image-feature-extraction", [tp(output=True), {"type": "export"},
                                                                           {"type": "evaluate"}])
    bad(clip, "no dense counterpart", "stages[0].output")
    text = {"name": "t", "model": {"source": str(bert_dir), "task": "feature-extraction"}, "stages": [tp()]}
    bad(text, "needs a vision encoder", "stages[0].type")


def test_method_picks_the_selectors_fields(vit_dir, images_dir):
    def tp(**kw):
        return {"type": "token_prune", "layer": 0, **kw}

    def vit(*stages):
        return image_recipe(vit_dir, images_dir, "image-classification", list(stages))
    bad(vit(tp(method="tome", keep=4)), f"'tome' is not allowed; allowed: {', '.join(SELECTORS.names())}$",
        "stages[0].method")
    bad(vit(tp(keep=4)), "required key is missing", "stages[0].method")
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(vit(tp(method="hiprune", keep=4, prompt="a cat"))))
    assert "object_layer, alpha" in e.value.message and "percentile" not in e.value.message


def test_describe_uses_the_selectors_fuse_default():
    def describe(**kw):
        return TokenPrune.describe(_validate(TokenPrune.Args, {"type": "token_prune", "layer": -2, **kw}, "stages[0]"))

    assert describe(method="trim", prompt="a cat") == "trim keep calibrated after layer -2 +fused"
    assert describe(method="divprune", keep=0.25, output=True) == "divprune keep 0.25 output of layer -2"


def test_sweep_reports_quality_against_k(vit_dir, images_dir, tmp_path):
    """Top-1 agreement with the unpruned ViT and accuracy (the images have class folders) at each K, the
    recipe's K included; K = N is the unpruned encoder; a table and a figure in report.md."""
    stages = [{"type": "calibrate"},
              {"type": "token_prune", "method": "cls_attention", "layer": 0, "keep": 0.5, "sweep": [0.25, 2]}]
    out = run(write_recipe(tmp_path, image_recipe(vit_dir, images_dir, "image-classification", stages)),
              output=tmp_path / "run")
    metrics = json.loads((out / "manifest.json").read_text())["stages"][1]["metrics"]
    agreement, accuracy = metrics["sweep"]["top-1 agreement with unpruned"], metrics["sweep"]["top-1 accuracy"]
    assert list(agreement) == list(accuracy) == ["2", "4", "8", "16"] and agreement["16"] == 1.0
    assert all(0.0 <= v <= 1.0 for v in [*agreement.values(), *accuracy.values()])
    report = (out / "report.md").read_text()
    assert "## token_prune: quality against K (calibration images)\n\n| K | top-1 agreement with unpruned | top-1 accuracy |" \
        in report
    assert "](stages/01-token_prune/quality_vs_k.png)" in report
    assert (out / "stages" / "01-token_prune" / "quality_vs_k.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("sweep, field, says", [([0], "stages[1].sweep[0]", "keeps no token"),
                                                 ([40], "stages[1].sweep[0]", "more than the 16 patch tokens")])
def test_sweep_values_are_checked(vit_dir, images_dir, sweep, field, says):
    stages = [{"type": "calibrate"}, {"type": "token_prune", "method": "cls_attention", "layer": 0, "keep": 4,
                                      "sweep": sweep}]
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(image_recipe(vit_dir, images_dir, "image-classification", stages)))
    assert e.value.field == field and says in e.value.message
