"""The embedded default recipe on the real MiniLM weights: what `make demo` produces."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort

from export import inspect as onnx_inspect
from export import qdq
from pipeline.runner import run


def test_default_recipe_end_to_end(tmp_path):
    out = run("recipes/default.yaml", output=tmp_path / "default")
    m = json.loads((out / "manifest.json").read_text())
    model = onnx.load(out / "model.onnx")
    dims = [d for v in [*model.graph.input, *model.graph.output] for d in v.type.tensor_type.shape.dim]
    assert all(d.dim_value > 0 and not d.dim_param for d in dims)
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert m["onnx"]["parity"]["max_rel_err"] <= 1e-4  # the float export's (the int8 graph's is under quantization)
    weights = onnx_inspect.linear_weights(model)  # int8 weights read back through their DequantizeLinear
    assert len([n for n in weights if n.startswith("encoder.layer.")]) == 36
    report = qdq.inspect_qdq(model)  # TensorRT's layout; the six FFN down projections stay float
    assert report.problems == [] and report.schemes == {"w8a8": 30}
    ev = m["evaluation"]
    assert ev["backend"] == "onnxruntime" and ev["comparison"]["samples"] == 64
    assert 0.94 < ev["comparison"]["mean_cosine"] < 1.0  # 0.949 measured (bench/results/distill-minilm.json)
    assert m["verdict"]["accepted"] is True  # the recipe's own gate: mean cosine at least 0.93
    distill = m["stages"][2]
    assert distill["type"] == "distill" and distill["metrics"]["loss_last"] < distill["metrics"]["loss_first"]
    lee = {k: ev[k]["lee"] for k in ("dense", "compressed")}  # the Lee data ships with `make`: never skipped
    assert abs(lee["dense"]["pearson"] - 0.6538) < 0.002 and abs(lee["dense"]["spearman"] - 0.5045) < 0.002
    assert abs(lee["compressed"]["pearson"] - 0.6849) < 0.02 and abs(lee["compressed"]["spearman"] - 0.5817) < 0.02
    assert ev["lee_protocol"]["documents"] == 50 and ev["lee_protocol"]["pairs"] == 1225
    assert m["model"]["params_before"] == 22_713_216 and m["model"]["params_after"] < 22_713_216
    flap = m["stages"][1]["metrics"]
    assert abs(flap["achieved_ratio"] - 0.2) < 0.02 and all(layer["mlp_channels"] % 64 == 0 for layer in flap["layers"])
    trt = m["onnx"]["tensorrt"]  # ready for JetPack 6's TensorRT 10.3; no 2:4 step in the default
    assert trt["target"] == "jetson-orin-jp6" and trt["tensorrt"] == "10.3.0" and trt["ok"] and not trt["errors"]
    assert trt["sparse_2_4_layers"] == 0
    spec = json.loads((out / "build" / "build_spec.json").read_text())
    assert not spec["sparsity"] and spec["graphs"][0]["inputs"][0] == {"name": "input_ids", "dtype": "int64",
                                                                    "shape": [1, 128]}
    assert (out / "build" / "build_engine.sh").stat().st_mode & 0o111
