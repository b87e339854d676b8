"""Token pruning: each method's selection against an independent reference, the static ONNX graph,
ONNX Runtime parity, and recipe errors for bad settings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import onnx as onnx_export
from export import tensorrt
from models.adapters import adapter_for
from core.errors import RecipeError, StageFailed
from models.spec import ModelSpec
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from tasks import TASKS, TaskModel
from export import token_graph as graph
from methods.tokens import trim
from methods.tokens.methods import ClsAttention, DivPrune, GlobalAttention, HiPrune, Trim
from methods.tokens.pruner import Placement, TokenPruner
from methods.tokens.text import TextEncoder

from ...conftest import write_recipe

PATCHES, GRID = 16, 4  # the conftest ViT/CLIP: 32x32 images, 8x8 patches


@pytest.fixture(scope="module")
def vit(vit_dir):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(vit_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clip(clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def clip_vision(clip_dir):
    from models.loading import model_config, resolve_source

    spec = ModelSpec(source=str(clip_dir), task="image-feature-extraction")
    config = model_config(spec, resolve_source(spec), TASKS[spec.task])
    return TASKS[spec.task].auto_class("clip").from_pretrained(clip_dir, config=config, attn_implementation="eager").eval()


def text_tower(clip_dir):
    """CLIPTextModelWithProjection and tokenizer, loaded the way the stage loads them."""
    from models.loading import load_model, resolve_source

    spec = ModelSpec(source=str(clip_dir), task="feature-extraction")
    return load_model(spec, resolve_source(spec), TASKS[spec.task])


def pixels(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_pass(model, x):
    """HF's own eager attention maps and hidden states (hidden_states[l + 1] is block l's output)."""
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    return [a.double().numpy() for a in out.attentions], [h.double().numpy() for h in out.hidden_states]


def select(model, task: str, method, layer: int, x, fuse=False, object_layer=None, **inputs):
    """Install ``method`` in output mode and return (features, indices) from the task model."""
    pruner = TokenPruner(model, adapter_for(model.config.model_type, task), method,
                         Placement(layer, fuse, True, object_layer), defaults=inputs)
    try:
        tm = TaskModel(model, ModelSpec(source="x", task=task))
        with torch.no_grad():
            features, idx = tm(*tm.example({"pixel_values": x}))
    finally:
        pruner.remove()
    return features.double().numpy(), idx.numpy()


def top_k_sorted(score: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-score, axis=-1, kind="stable")[:, :k], axis=-1)


def gathered(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.stack([x[b, idx[b]] for b in range(len(idx))])


def test_cls_attention_is_hf_cls_row_of_the_layer(vit):
    x = pixels(0)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", ClsAttention(5), 1, x)
    want = top_k_sorted(attn[1][:, :, 0, 1:].mean(axis=1), 5)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features, gathered(hidden[2][:, 1:], want), atol=1e-6)


def test_global_attention_is_hf_column_mean(vit):
    x = pixels(1)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", GlobalAttention(6), 0, x)
    want = top_k_sorted(attn[0].mean(axis=(1, 2))[:, 1:], 6)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features, gathered(hidden[1][:, 1:], want), atol=1e-6)


def test_fused_token_is_the_score_weighted_mean_of_dropped_patches(vit):
    x = pixels(2)
    attn, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", ClsAttention(4), 1, x, fuse=True)
    score, patches = attn[1][:, :, 0, 1:].mean(axis=1), hidden[2][:, 1:]
    for b in range(len(idx)):
        rest = np.setdiff1d(np.arange(PATCHES), idx[b])
        w = score[b, rest] / score[b, rest].sum()
        np.testing.assert_allclose(features[b, -1], w @ patches[b, rest], atol=1e-6)
    assert features.shape == (2, 4 + 1, 32)


def divprune_reference(x: np.ndarray, k: int) -> np.ndarray:
    """Greedy max-min diversity (DivPrune, docs/methods/token-pruning.md §7.2) on one image's tokens [N, D], float64."""
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    dist = 1.0 - xn @ xn.T
    picked = [int(np.argmax(np.sort(dist, axis=0)[1]))]
    while len(picked) < k:
        m = dist[picked].min(axis=0)
        m[picked] = -np.inf
        picked.append(int(np.argmax(m)))
    return np.sort(picked)


def test_divprune_is_greedy_max_min(vit):
    x = pixels(3)
    _, hidden = reference_pass(vit, x)
    features, idx = select(vit, "image-classification", DivPrune(7), 1, x)
    want = np.stack([divprune_reference(h[1:], 7) for h in hidden[2]])
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features, gathered(hidden[2][:, 1:], want), atol=1e-6)


def hiprune_reference(obj: np.ndarray, deep: np.ndarray, k: int, anchors: int, width: int) -> np.ndarray:
    """HiPrune's reference steps for one image: anchors, ±1/±W buffers, unique, registers (docs/methods/token-pruning.md §8.2)."""
    n = deep.size
    a = np.argsort(-obj, kind="stable")[:anchors]
    buffers = np.concatenate([a, a - 1, a + 1, a - width, a + width]).clip(0, n - 1)
    ab = np.unique(buffers)
    registers = deep.copy()
    registers[ab] -= 1
    rest = np.argsort(-registers, kind="stable")[:k - len(ab)]
    return np.sort(np.concatenate([ab, rest]))


def test_hiprune_matches_reference_with_unique(vit):
    x = pixels(4)
    attn, _ = reference_pass(vit, x)
    method = HiPrune(8, anchors=1)
    _, idx = select(vit, "image-classification", method, 1, x, object_layer=0)
    obj, deep = attn[0].mean(axis=(1, 2))[:, 1:], attn[1].mean(axis=(1, 2))[:, 1:]
    want = np.stack([hiprune_reference(obj[b], deep[b], 8, 1, GRID) for b in range(2)])
    np.testing.assert_array_equal(idx, want)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_trim_scores_projected_patches_against_the_text(clip, clip_vision, clip_dir, sign):
    text = TextEncoder(*text_tower(clip_dir), 16)
    t = text.embed(["a photo of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(t, clip.get_text_features(input_ids=text.ids(["a photo of a cat"])).pooler_output)
    x = pixels(5)
    _, hidden = reference_pass(clip_vision, x)
    method = Trim(6, sign, adapter_for("clip", "image-feature-extraction").joint_space(clip_vision))
    features, idx = select(clip_vision, "image-feature-extraction", method, 0, x, fuse=True, text_embeds=t)
    f = hidden[1][:, 1:]
    ln = clip.vision_model.post_layernorm
    with torch.no_grad():
        projected = clip.visual_projection(ln(torch.from_numpy(f).float())).double().numpy()
    s = projected @ t.double().numpy()[0]
    p = trim.softmax(sign * s)
    want = top_k_sorted(p, 6)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features[:, :6], gathered(f, want), atol=1e-6)
    for b in range(2):
        rest = np.setdiff1d(np.arange(PATCHES), want[b])
        np.testing.assert_allclose(features[b, 6], f[b, rest].mean(axis=0), atol=1e-6)


def test_inside_placement_runs_later_blocks_on_the_kept_tokens(vit):
    x = pixels(6)
    _, hidden = reference_pass(vit, x)
    pruner = TokenPruner(vit, adapter_for("vit", "image-classification"), ClsAttention(5), Placement(0, False, False))
    try:
        with torch.no_grad():
            logits = vit(pixel_values=x).logits
        idx = pruner.last_index
    finally:
        pruner.remove()
    h = torch.from_numpy(hidden[1]).float()
    kept = torch.cat([h[:, :1], torch.stack([h[b, 1:][idx[b]] for b in range(2)])], dim=1)
    with torch.no_grad():
        want = vit.classifier(vit.vit.layernorm(vit.vit.layers[1](kept, None))[:, 0])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert kept.shape[1] == 1 + 5


def test_trim_iqr_count_and_percentile():
    p = np.array([0.01] * 12 + [0.02, 0.03, 0.30, 0.50])  # Q1 = 0.01, Q3 = 0.0125 -> upper = 0.01625
    assert trim.iqr_count(p) == 4
    assert trim.fixed_k([1, 2, 3, 4, 10], 90, 16) == 8  # 90th percentile 7.6 (linear), rounded up
    assert trim.fixed_k([20, 20], 50, 16) == 15  # one patch always left to aggregate
    sim = np.log(np.stack([p, p[::-1]]))
    assert trim.counts(sim, 1.0) == [4, 4]


def _topk_graph(k_from_input: bool, extra_op: str | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    inputs = [x]
    nodes, inits = [], [numpy_helper.from_array(np.array([3], np.int64), "k")]
    if k_from_input:
        nodes.append(helper.make_node("Shape", ["x"], ["shape"], start=1))
        nodes.append(helper.make_node("Div", ["shape", "two"], ["k"]))
        inits = [numpy_helper.from_array(np.array([2], np.int64), "two")]
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"]))
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["x"], ["nz"]))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, None))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = onnx_export.IR_VERSION
    return m


def test_topk_constants_and_readiness_flag_a_computed_k():
    assert graph.topk_constants(_topk_graph(False)) == [3]
    assert graph.topk_constants(_topk_graph(True)) == [None]
    assert tensorrt.check(_topk_graph(False), "jetson-orin-jp6").ok
    errors = [str(f) for f in tensorrt.check(_topk_graph(True), "jetson-orin-jp6").errors]
    assert any("TopK" in e and "K" in e for e in errors), errors


def image_recipe(model_dir, images_dir, task, stages, **export):
    return {"name": "t", "model": {"source": str(model_dir), "task": task},
            "calibration": {"source": "images", "path": str(images_dir), "num_samples": 6, "batch_size": 3},
            "stages": stages, "export": {"batch_size": 2, **export},
            "evaluation": {"source": "images", "path": str(images_dir), "num_samples": 6,
                           "latency": {"iterations": 5, "warmup": 1}}}


STAGE_CASES = {"cls_attention": {"fuse": True}, "global_attention": {}, "divprune": {},
               "hiprune": {"alpha": 0.6, "object_layer": 0}}


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
    from models.loading import load_model, resolve_source
    from calibration.spec import CalibrationSpec

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
    for name, sign in trim.SIGNS.items():
        counts = trim.counts(sim, sign)
        assert info[name]["keep"] == trim.fixed_k(counts, 90, PATCHES)
        assert info[name]["counts"]["mean"] == round(float(np.mean(counts)), 2)
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


def test_text_graph_padding_does_not_change_the_embedding(clip_dir):
    """CLIP pools at the first end-of-text token under a causal mask, so padding to the static length is inert."""
    model, tok = text_tower(clip_dir)
    model.config.eos_token_id = model.text_model.eos_token_id = tok.sep_token_id  # the BERT vocab's end token
    encoder = TextEncoder(model, tok, 24)
    short = tok(["a photo of a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unpadded = model(input_ids=short).text_embeds
    torch.testing.assert_close(encoder.embed(["a photo of a cat"]), unpadded)


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

    vit = lambda *stages: image_recipe(vit_dir, images_dir, "image-classification", list(stages))  # noqa: E731
    bad(vit(tp(keep=None)), "keep is required", "stages[0].keep")
    bad(vit(tp(layer=2)), "layer 2 does not exist", "stages[0].layer")
    bad(vit(tp(prompt="a cat")), "only used by method 'trim'", "stages[0].prompt")
    bad(vit(tp(percentile=50)), "only used by method 'trim'", "stages[0].percentile")
    bad(vit(tp(alpha=0.5)), "only used by method 'hiprune'", "stages[0].alpha")
    bad(vit(tp(keep=16, fuse=True)), "nothing to fuse", "stages[0].keep")
    bad(vit(tp(method="hiprune", object_layer=1, layer=0)), "comes after the pruning layer", "stages[0].object_layer")
    bad(vit(tp(method="hiprune", keep=8, alpha=1.0)), "anchors", "stages[0].alpha")
    bad(vit(tp(method="trim", prompt="a cat")), "needs calibration data", "stages[0]")
    bad(vit({"type": "calibrate"}, tp(method="trim", prompt="a cat")), "CLIP vision tower", "stages[1].method")
    bad(vit(tp(method="trim")), "trim needs the text", "stages[0].prompt")
    bad(vit(tp(output=True)), "image-feature-extraction", "stages[0].output")
    bad(vit({"type": "export"}, tp()), "changes the model after it was exported", "stages[1]")
    bad(vit(tp(), {"type": "prune_weights", "method": "magnitude", "sparsity": 0.5}), "comes after token_prune",
        "stages[0]")
    clip = image_recipe(clip_dir, images_dir, "image-feature-extraction", [tp(output=True), {"type": "export"},
                                                                           {"type": "evaluate"}])
    bad(clip, "no dense counterpart", "stages[0].output")
    text = {"name": "t", "model": {"source": str(bert_dir), "task": "feature-extraction"}, "stages": [tp()]}
    bad(text, "needs a vision encoder", "stages[0].type")
