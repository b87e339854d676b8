"""The Q/DQ layout checker on deliberately wrong graphs (each must be named) and the right one, and
giving non-compute readers their float tensor back."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export import qdq

from .tiny import model, vi

RNG = np.random.default_rng(0)


def _dq(name, x, scale, zp, axis=None, block=None):
    kw = {k: v for k, v in (("axis", axis), ("block_size", block)) if v is not None}
    return helper.make_node("DequantizeLinear", [x, scale, zp] if zp else [x, scale], [name + "_out"], name=name, **kw)


def _wrong(kind: str) -> onnx.ModelProto:
    """Tiny graphs with one layout TensorRT would not fuse each."""
    w = RNG.integers(-127, 127, (3, 2)).astype(np.int8)
    inits = {"w": w, "ws": np.full(2, 0.1, np.float32), "wz": np.zeros(2, np.int8), "xs": np.float32(0.05),
             "xz": np.int8(0), "xzu": np.uint8(128), "bias": np.array([3, -4], np.int32), "bs": np.float32(0.01)}
    q = helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q")
    act = _dq("adq", "xq", "xs", "xz")
    wdq = _dq("wdq", "w", "ws", "wz", axis=1)
    nodes = [q, act, wdq, helper.make_node("MatMul", ["adq_out", "wdq_out"], ["y"], name="mm")]
    if kind == "asymmetric":
        q.input[2], act.input[2] = "xzu", "xzu"
    elif kind == "axis":
        wdq.attribute[0].i = 0
        inits["ws"] = np.full(3, 0.1, np.float32)
        inits["wz"] = np.zeros(3, np.int8)
    elif kind == "quantized_output":
        nodes[-1] = helper.make_node("MatMul", ["adq_out", "wdq_out"], ["mmo"], name="mm")
        nodes += [helper.make_node("QuantizeLinear", ["mmo", "xs", "xz"], ["oq"], name="oq"),
                  _dq("odq", "oq", "xs", "xz"), helper.make_node("Relu", ["odq_out"], ["y"], name="relu")]
    elif kind == "int32_bias":
        nodes[-1] = helper.make_node("Gemm", ["adq_out", "wdq_out", "bdq_out"], ["y"], name="mm")
        nodes.insert(-1, _dq("bdq", "bias", "bs", None))
    elif kind == "activation_only":
        nodes = [q, act, helper.make_node("MatMul", ["adq_out", "wf"], ["y"], name="mm")]
        inits["wf"] = w.astype(np.float32)
    elif kind == "integer_reader":
        nodes.append(helper.make_node("Cast", ["xq"], ["xc"], to=TensorProto.FLOAT, name="cast"))
        return model(nodes, [vi("x", [4, 3])], [vi("y", [4, 2]), vi("xc", [4, 3])], inits, opset=21)
    return model(nodes, [vi("x", [4, 3])], [vi("y", [4, 2])], inits, opset=21)


@pytest.mark.parametrize("kind, words", [
    ("asymmetric", "non-zero zero point"),
    ("asymmetric", "uint8 quantization"),
    ("axis", "not the output-channel axis 1"),
    ("quantized_output", "feeds Relu relu"),
    ("int32_bias", "int32 tensor 'bias' dequantized"),
    ("activation_only", "activation quantized but weight 'wf' is float"),
    ("integer_reader", "q: quantized output 'xq' feeds Cast cast directly (integer op outside explicit Q/DQ)"),
])
def test_checker_names_each_wrong_layout(kind, words):
    problems = qdq.inspect_qdq(_wrong(kind)).problems
    assert any(words in p for p in problems), problems


def test_checker_passes_the_right_layout():
    report = qdq.inspect_qdq(_wrong("none"))
    assert report.problems == [] and report.schemes == {"w8a8": 1}
    assert report.dtypes == {"adq": "int8", "wdq": "int8"}
    assert report.nodes[0]["inputs"]["weight"] == {"tensor": "w", "dtype": "int8", "granularity": "per-channel axis 1",
                                                   "zero_point_max_abs": 0}


def test_residual_reader_gets_the_float_tensor_and_dead_qdq_goes():
    """x -> Q -> DQ feeds both the MatMul and a Sigmoid (as ONNX Runtime's quantizer leaves it); a
    second Q/DQ pair only feeds the Sigmoid of another input and is dropped once rewired."""
    inits = {"w": np.ones((3, 2), np.float32), "xs": np.float32(0.05), "xz": np.int8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
             helper.make_node("Sigmoid", ["xd"], ["s"], name="side"),
             helper.make_node("QuantizeLinear", ["z", "xs", "xz"], ["zq"], name="zq"),
             helper.make_node("DequantizeLinear", ["zq", "xs", "xz"], ["zd"], name="zdq"),
             helper.make_node("Relu", ["zd"], ["r"], name="relu")]
    m = model(nodes, [vi("x", [4, 3]), vi("z", [4, 3])], [vi("y", [4, 2]), vi("s", [4, 3]), vi("r", [4, 3])], inits)
    graph = ir.from_proto(m)
    assert qdq.restrict_to_compute_inputs(graph) == 2
    readers = {n.name: [v.name for v in n.inputs] for n in graph.graph}
    assert readers == {"q": ["x", "xs", "xz"], "dq": ["xq", "xs", "xz"], "mm": ["xd", "w"], "side": ["x"],
                       "relu": ["z"]}
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    out = ort.InferenceSession(ir.to_proto(graph).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["s", "r"], {"x": x, "z": x})
    np.testing.assert_allclose(out[0], 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_array_equal(out[1], np.maximum(x, 0))
