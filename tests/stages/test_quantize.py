"""The quantize and smoothquant stages in whole runs on tiny models, and their recipe rules."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from core.errors import RecipeError
from core.files import sha256_path
from export import inspect as onnx_inspect
from export import qdq
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run

from ..conftest import text_recipe, write_recipe

# no statistics: leaves the cache to other tests
MAGNITUDE_24 = {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"}
FFN_DOWN = r"re:.*layer\.\d+\.output\.dense$"


X86_TRT10 = {"tensorrt": {"target": "x86-trt10"}}  # int4's blocked DequantizeLinear needs opset 21


def _run(tmp_path, model_dir, task, stages, **sections):
    out = run(write_recipe(tmp_path, text_recipe(model_dir, task, stages, **sections)), output=tmp_path / "out")
    return out, json.loads((out / "manifest.json").read_text()), onnx.load(out / "model.onnx")


@pytest.fixture(scope="module")
def bert_int8(bert_dir, tmp_path_factory):
    stages = [{"type": "calibrate"}, MAGNITUDE_24, {"type": "export"},
              {"type": "quantize", "format": "int8", "calibrate_method": "percentile", "ignore": [FFN_DOWN]},
              {"type": "evaluate"}]
    return _run(tmp_path_factory.mktemp("bert_int8"), bert_dir, "feature-extraction", stages)


def test_int8_qdq_placement_on_exported_bert(bert_int8):
    out, m, model = bert_int8
    report = qdq.inspect_qdq(model)
    assert report.problems == []
    by_module = {n["module"]: n for n in report.nodes}
    linears = [f"encoder.layer.{i}.{p}" for i in range(2) for p in
               ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense")]
    assert sorted(by_module) == sorted(linears)  # FFN down (ignored) and attention matmuls stay float
    for node in by_module.values():
        assert node["scheme"] == "w8a8"
        assert node["inputs"]["weight"]["granularity"] == "per-channel axis 1"
        assert node["inputs"]["activation"]["granularity"] == "per-tensor"
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:  # Q/DQ only on compute inputs: norms, residual adds, softmax read float
        if node.op_type not in qdq.COMPUTE_OPS + qdq.QDQ_OPS:
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input), node.name
    q = m["stages"][3]["metrics"]
    assert q["quantized_ops"] == 10 and q["sparsity_check"]["ok"] and q["parity"]["max_rel_err"] <= 0.25
    details = m["onnx"]["quantization"]
    assert details["calibration"]["method"] == "percentile" and details["calibration"]["shape"] == [2, 16]
    assert details["kept_float"] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert (out / "stages" / "03-quantize" / "calibration_ranges.json").is_file()
    assert m["evaluation"]["backend"] == "onnxruntime" and m["evaluation"]["comparison"]["mean_cosine"] > 0.9
    assert "## quantize: Quantized ops (Q/DQ placement)" in (out / "report.md").read_text()


def test_int8_build_material_describes_the_quantized_graph(bert_int8):
    out, m, _ = bert_int8
    trt = m["onnx"]["tensorrt"]
    assert trt["ok"] and trt["checks"]["qdq"] == "pass" and trt["weights"]["bytes_by_type"]["INT8"] > 0
    spec = json.loads((out / "build" / "build_spec.json").read_text())
    assert spec["graphs"][0]["onnx"]["sha256"] == sha256_path(out / "model.onnx")  # not the float graph export wrote
    assert json.loads((out / "stages" / "03-quantize" / "tensorrt.json").read_text())["ok"]


def test_int8_keeps_2_of_4_zeros(bert_int8):
    _, _, model = bert_int8
    weights = onnx_inspect.linear_weights(model)  # dequantized through the weight DQ
    assert len(weights) == 12
    inits = {i.name for i in model.graph.initializer}
    for name, w in weights.items():
        assert onnx_inspect.nm_violations(w, 2, 4) == 0 and (w == 0).mean() >= 0.5, name
    node = onnx_inspect.linear_nodes(model)["encoder.layer.0.attention.self.query"]
    dq = node.inputs[1].producer()
    q = dq.inputs[0].const_value.numpy()
    assert dq.inputs[0].name in inits and q.dtype == np.int8 and (q == 0).mean() >= 0.5


def test_smoothquant_int8_fp16_on_llama(llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "smoothquant", "alpha": 0.6}, {"type": "export"},
              {"type": "quantize", "format": "int8", "float16": True}, {"type": "evaluate"}]
    out, m, model = _run(tmp_path, llama_dir, "causal-lm", stages)
    sq = m["stages"][1]["metrics"]
    assert sq["groups"] == 4 and sq["outlier_ratio_after"] <= sq["outlier_ratio_before"]
    assert m["onnx"]["opset"] == 19 and m["onnx"]["quantization"]["float_dtype"] == "float16"
    assert qdq.inspect_qdq(model).schemes == {"w8a8": 14}
    assert {i.data_type for i in model.graph.initializer if i.name.endswith("_scale")} == {onnx.TensorProto.FLOAT16}
    assert m["onnx"]["onnxruntime"]["disabled_optimizers"] and 0.9 < m["evaluation"]["comparison"]["perplexity_ratio"] < 1.1


def test_int4_partial_groups_keep_zeros_on_llama(llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, MAGNITUDE_24, {"type": "export"},
              {"type": "quantize", "format": "int4", "group_size": 128, "partial_groups": True}]
    _, m, model = _run(tmp_path, llama_dir, "causal-lm", stages, export=X86_TRT10)
    details = m["onnx"]["quantization"]
    assert m["onnx"]["opset"] == 21 and details["partial_groups"] == {"64": "last group has 64 weights"}
    assert qdq.inspect_qdq(model).schemes == {"w4 weight-only": 14}
    assert m["onnx"]["tensorrt"]["target"] == "x86-trt10" and m["onnx"]["tensorrt"]["ok"]
    for name, w in onnx_inspect.linear_weights(model).items():
        if name.startswith("model.layers."):
            assert onnx_inspect.nm_violations(w, 2, 4) == 0, name


@pytest.mark.parametrize("model, task, linears", [("vit", "image-classification", 12),
                                                  ("clip", "image-feature-extraction", 12)])
def test_smoothquant_int8_on_vision_towers(vit_dir, clip_dir, images_dir, tmp_path, model, task, linears):
    images = {"source": "images", "path": str(images_dir)}
    recipe = {"name": model, "model": {"source": str({"vit": vit_dir, "clip": clip_dir}[model]), "task": task},
              "calibration": {**images, "num_samples": 8, "batch_size": 4}, "export": {"batch_size": 2},
              "stages": [{"type": "calibrate"}, {"type": "smoothquant"}, {"type": "export"},
                         {"type": "quantize", "format": "int8", "calibrate_method": "entropy"}]}
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    report = qdq.inspect_qdq(onnx.load(out / "model.onnx"))
    assert report.problems == [] and report.schemes == {"w8a8": linears}  # the patch Conv is no block Linear


@pytest.mark.parametrize("stages, field, words", [
    ([{"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 64}], "stages[1].format",
     "int4 weight-only, group 64 needs ONNX opset 21, above the 20 that TensorRT 10.3.0 (jetson-orin-jp6) parses; "
     "set export.tensorrt.target to one of: x86-trt10, x86-trt11"),
    ([{"type": "calibrate"}, {"type": "quantize", "format": "fp16"}, {"type": "export"}],
     "stages[1]", "put '- type: export' before it"),
    ([{"type": "calibrate"}, {"type": "export"}, {"type": "quantize", "format": "fp16"},
      {"type": "quantize", "format": "int4"}], "stages[3]", "keep one 'quantize' stage"),
    ([{"type": "export"}, {"type": "quantize", "format": "int8"}], "stages[1]", "needs calibration data"),
    ([{"type": "export"}, {"type": "quantize", "format": "fp16", "group_size": 64}], "stages[1].group_size",
     "unknown key; allowed keys: "),
    ([{"type": "export"}, {"type": "quantize", "format": "fp16", "ignore": ["x"]}], "stages[1].ignore",
     "unknown key; allowed keys: "),
    ([{"type": "export"}, {"type": "quantize", "format": "int4", "float16": True}], "stages[1].float16",
     "unknown key; allowed keys: "),
    ([{"type": "export"}, {"type": "quantize", "format": "int8", "percentile": 99.0}], "stages[1]",
     "percentile only applies to calibrate_method 'percentile'"),
    ([{"type": "export"}, {"type": "quantize", "format": "int2"}], "stages[1].format",
     "'int2' is not allowed; allowed: fp16, int4, int8, w8a16"),
    ([{"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 8}], "stages[1].group_size",
     "greater than or equal to 16"),
    ([{"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 128}], "stages[1].group_size",
     "does not divide the input width 64"),
    ([{"type": "export"}, {"type": "quantize", "format": "int4", "targets": ["re:nothing"]}], "stages[1].targets",
     "no layer left"),
    ([{"type": "calibrate"}, MAGNITUDE_24, {"type": "smoothquant"}], "stages[2]", "add another '- type: calibrate'"),
])
def test_recipe_rules(llama_dir, stages, field, words):
    sections = {"export": X86_TRT10} if field != "stages[1].format" else {}
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(llama_dir, "causal-lm", stages, **sections)))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_smoothquant_refuses_post_norm_bert(bert_dir):
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, {"type": "smoothquant"}])))
    assert e.value.field == "stages[1].type" and "post-norm" in e.value.message


def test_a_stray_field_lists_the_formats_own_keys(llama_dir):
    stages = [{"type": "export"}, {"type": "quantize", "format": "fp16", "group_size": 64}]
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_recipe(llama_dir, "causal-lm", stages))
    allowed = set(e.value.message.removeprefix("unknown key; allowed keys: ").split(", "))
    assert allowed == {"type", "name", "format", "rtol"}


@pytest.mark.parametrize("rtol", [None, 0.9])
def test_quantized_causal_lm_is_gated_on_its_fidelity_unless_rtol_is_set(llama_dir, tmp_path, rtol):
    q = {"type": "quantize", "format": "w8a16", **({"rtol": rtol} if rtol else {})}
    _, m, model = _run(tmp_path, llama_dir, "causal-lm", [{"type": "export"}, q])
    details = m["onnx"]["quantization"]
    assert details["parity"]["rtol"] == rtol and qdq.inspect_qdq(model).schemes == {"w8 weight-only": 14}
    if rtol is None:
        f = details["fidelity"]
        assert f["bounds"] == {"perplexity_ratio": "max 3", "token_agreement": "min 0.3"}
        assert f["perplexity_ratio"] < 1.05 and f["token_agreement"] > 0.9
        assert m["stages"][1]["metrics"]["fidelity"]["token_agreement"] == f["token_agreement"]
    else:
        assert "fidelity" not in details and details["parity"]["max_rel_err"] <= rtol
