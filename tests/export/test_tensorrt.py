"""TensorRT readiness over ONNX graphs: static shapes, operator tables, attribute limits, Q/DQ, sparsity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import StageFailed
from export import onnx as onnx_export
from export import tensorrt
from pipeline.runner import run

from ..conftest import text_recipe, write_recipe


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = onnx_export.IR_VERSION
    return m


def _vi(name, dims, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, dims)


def _matmul(dims_a, w=None, name="mm"):
    w = np.ones((4, 8), np.float32) if w is None else w
    return _model([helper.make_node("MatMul", ["a", "w"], ["y"], name=name)], [_vi("a", dims_a)],
                  [_vi("y", [dims_a[0], w.shape[1]])], [numpy_helper.from_array(w, "w")])


def _errors(model, target="jetson-orin-jp6"):
    return [str(f) for f in tensorrt.check(model, target).errors]


def test_static_matmul_is_ready_on_every_10x_target():
    for target in ("jetson-orin-jp6", "x86-trt10", "x86-trt11"):
        r = tensorrt.check(_matmul([2, 4]), target)
        assert r.ok, r.errors
        assert r.weights == {"bytes": 4 * 8 * 4, "bytes_by_type": {"FLOAT": 128},
                             "largest": {"name": "w", "bytes": 128}, "initializers": 1}


def test_dynamic_input_dimension_fails_naming_the_node():
    errors = _errors(_matmul(["batch", 4]))
    assert errors[0].startswith("MatMul 'mm': dimension 0 of input 'a' is batch (dynamic)")
    assert tensorrt.check(_matmul(["batch", 4]), "jetson-orin-jp6").as_dict()["checks"]["static-shapes"] == "fail"


def test_data_dependent_shape_fails_naming_the_producer():
    m = _model([helper.make_node("NonZero", ["a"], ["nz"], name="where_nonzero"),
                helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT, name="cast")],
               [_vi("a", [2, 4])], [_vi("y", [2, 8])])
    errors = _errors(m)
    assert any(e.startswith("NonZero 'where_nonzero': dimension 1 of tensor 'nz'") for e in errors), errors


def test_unsupported_and_custom_operators_are_named():
    m = _model([helper.make_node("Unique", ["a"], ["u"], name="uniq"),
                helper.make_node("FusedMatMul", ["a", "a"], ["y"], domain="com.microsoft", name="fused")],
               [_vi("a", [4, 4])], [_vi("u", [4]), _vi("y", [4, 4])],
               extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    errors = _errors(m)
    assert "Unique 'uniq': Unique is not supported by TensorRT 10.3.0's ONNX parser" in errors
    assert "FusedMatMul 'fused': custom-domain operator 'com.microsoft::FusedMatMul' needs a TensorRT plugin" in errors


def test_jetpack5_has_no_layernorm_and_stops_at_opset_17():
    ln = _model([helper.make_node("LayerNormalization", ["a", "s"], ["y"], name="ln", axis=-1)],
                [_vi("a", [2, 4])], [_vi("y", [2, 4])], [numpy_helper.from_array(np.ones(4, np.float32), "s")])
    assert tensorrt.check(ln, "jetson-orin-jp6").ok
    errors = _errors(ln, "jetson-orin-jp5")
    assert errors == ["opset 18 is above TensorRT 8.5.2's ONNX parser maximum 17; export with export.opset <= 17",
                      "LayerNormalization 'ln': LayerNormalization is not supported by TensorRT 8.5.2's ONNX parser"]


def _topk(k, k_const=True, sorted_=1):
    inits = [numpy_helper.from_array(np.array([k], np.int64), "k")] if k_const else []
    inputs = [_vi("a", [1, 5000])] + ([] if k_const else [_vi("k", [1], TensorProto.INT64)])
    return _model([helper.make_node("TopK", ["a", "k"], ["v", "i"], name="topk", sorted=sorted_)], inputs,
                  [_vi("v", [1, k]), _vi("i", [1, k], TensorProto.INT64)], inits)


def test_topk_limits():
    assert tensorrt.check(_topk(8), "jetson-orin-jp6").ok
    assert "TopK 'topk': TopK K=3840 must be less than 3840" in _errors(_topk(3840))
    assert "TopK 'topk': input 'K' must be a build-time constant (initializer or Constant) for TensorRT" in \
        _errors(_topk(8, k_const=False))
    assert "TopK 'topk': TopK 'sorted' must be 1" in _errors(_topk(8, sorted_=0))


def test_constant_inputs_per_target():
    """Slice axes may be a tensor from TensorRT 10.3 (parser CHANGELOG); Reduce axes never."""
    starts, ends = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "st"), (2, "en")))
    sl = _model([helper.make_node("Slice", ["a", "st", "en", "ax"], ["y"], name="slice")],
                [_vi("a", [4, 4]), _vi("ax", [1], TensorProto.INT64)], [_vi("y", [4, 2])], [starts, ends])
    assert not any("slice" in e for e in _errors(sl, "jetson-orin-jp6"))
    assert "Slice 'slice': input 'axes' must be a build-time constant (initializer or Constant) for TensorRT" in \
        _errors(sl, "jetson-orin-jp5")
    red = _model([helper.make_node("ReduceMean", ["a", "ax"], ["y"], name="mean", keepdims=0)],
                 [_vi("a", [4, 4]), _vi("ax", [1], TensorProto.INT64)], [_vi("y", [4])])
    assert "ReduceMean 'mean': input 'axes' must be a build-time constant (initializer or Constant) for TensorRT" \
        in _errors(red)


def _qdq_matmul(zero_point=0, zp_type=np.int8, axis=1, scale_shape=(8,), bias_int32=False, quantize_output=False):
    """x -> Q -> DQ -> MatMul(., DQ(int8 weight)) [+ DQ(int32 bias)] -> y."""
    w = numpy_helper.from_array(np.ones((4, 8), zp_type), "wq")
    inits = [w, numpy_helper.from_array(np.full(scale_shape, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.full(scale_shape, zero_point, zp_type), "wz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(zero_point, zp_type), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dq_w", axis=axis),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"], name="mm")]
    if bias_int32:
        inits += [numpy_helper.from_array(np.ones(8, np.int32), "bq"),
                  numpy_helper.from_array(np.array(0.005, np.float32), "bs")]
        nodes += [helper.make_node("DequantizeLinear", ["bq", "bs"], ["bd"], name="dq_bias"),
                  helper.make_node("Add", ["mm", "bd"], ["y"], name="add")]
    else:
        nodes.append(helper.make_node("Identity", ["mm"], ["y"], name="out"))
    out = "y"
    if quantize_output:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "xs", "xz"], ["yq"], name="q_out"))
        out = "yq"
    return _model(nodes, [_vi("x", [2, 4])], [_vi(out, [2, 8], TensorProto.INT8 if quantize_output else
                                                      TensorProto.FLOAT)], inits)


def test_qdq_layout_tensorrt_fuses_passes():
    assert tensorrt.qdq_findings(_qdq_matmul()) == []
    assert tensorrt.check(_qdq_matmul(), "jetson-orin-jp6").ok


@pytest.mark.parametrize("kwargs, expected", [
    ({"zero_point": 3}, "dq_w: non-zero zero point on 'wq' (asymmetric); TensorRT needs zero-point 0"),
    ({"zp_type": np.uint8}, "dq_x: uint8 quantization of 'xq' is unsigned or asymmetric"),
    ({"axis": 0}, "dq_w: per-channel axis 0 of 'wq' is not the output-channel axis 1 of MatMul mm"),
    ({"bias_int32": True}, "dq_bias: int32 tensor 'bq' dequantized (a quantized bias); keep biases in float"),
    ({"quantize_output": True}, "q_out: a graph output is quantized ('yq')"),
])
def test_qdq_layouts_tensorrt_cannot_fuse(kwargs, expected):
    findings = [str(f) for f in tensorrt.qdq_findings(_qdq_matmul(**{"scale_shape": (8,), **kwargs}))]
    assert any(f.startswith(expected) for f in findings), findings


def test_per_channel_activation_scale_is_refused():
    m = _qdq_matmul()
    for init in m.graph.initializer:  # give the activation Q/DQ pair a per-channel scale
        if init.name in ("xs", "xz"):
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.full(4, arr, arr.dtype), init.name))
    findings = [str(f) for f in tensorrt.qdq_findings(m)]
    assert "dq_x: per-channel scales on activation 'xq'; TensorRT wants per-tensor activation scales" in findings


def test_fp8_weights_need_a_tensorrt_10_target():
    w = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [4, 8], np.ones(32, np.float32))
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    m = _model([helper.make_node("DequantizeLinear", ["w8", "s"], ["w"], name="dq_w8"),
                helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")],
               [_vi("a", [2, 4])], [_vi("y", [2, 8])], [w, scale], opset=19)  # FP8 DQ: opset 19
    assert tensorrt.check(m, "jetson-orin-jp6").ok
    assert "DequantizeLinear 'dq_w8': FLOAT8E4M3FN quantization is unsupported by this target (supported: INT8)" \
        in _errors(m, "jetson-orin-jp5")


def test_sparsity_per_layer():
    w24 = np.array([[1, 0], [0, 2], [3, 0], [0, 0], [0, 0], [5, 6], [0, 7], [0, 0]], np.float32)  # [K=8, N=2]
    layers = tensorrt.sparsity_layers(_matmul([2, 8], w24))
    assert layers == [{"node": "mm", "module": None, "shape_kn": [8, 2], "zeros": 0.625, "2:4": True}]
    w24[1, 0] = 1.0  # first group of 4 along K in column 0 now has 3 non-zeros
    assert tensorrt.sparsity_layers(_matmul([2, 8], w24))[0]["2:4"] is False
    assert tensorrt.check(_matmul([2, 8], w24), "jetson-orin-jp6").sparse_layers == 0


def test_export_fails_on_a_target_the_graph_does_not_fit(bert_dir, tmp_path):
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "export"}],
                         export={"tensorrt": {"target": "jetson-orin-jp5"}})
    with pytest.raises(StageFailed) as e:
        run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    assert e.value.field == "export.tensorrt.target"
    assert "not ready for TensorRT 8.5.2 (jetson-orin-jp5): opset 18 is above" in e.value.message
    assert "LayerNormalization 'node_layer_norm'" in e.value.message
    saved = json.loads(next(tmp_path.glob(".out.partial/stages/*-export/tensorrt.json")).read_text())
    assert saved["ok"] is False and saved["checks"]["opset"] == "fail" and saved["checks"]["operators"] == "fail"
