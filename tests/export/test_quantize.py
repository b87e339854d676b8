"""Graph precision: INT8 Q/DQ scales by hand, placement and the TensorRT checker, INT4 blocks, FP16.

Numbers are checked against hand computations on tiny graphs; the checker against exported
graphs (it must pass) and deliberately wrong layouts (each must be named).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import onnx as onnx_export
from export import qdq
from export import quantize as graph

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = onnx_export.IR_VERSION
    return m


def _linear_graph(w: np.ndarray, b: np.ndarray, rows: int = 4) -> onnx.ModelProto:
    """y = relu(x @ w + b): one compute op with a float bias Add and a non-compute reader of x."""
    k, n = w.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [rows, k])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
             helper.make_node("Add", ["xw", "b"], ["xwb"], name="bias"),
             helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["s"], name="side")]  # a non-compute reader of the activation
    return _model(nodes, [x], [y, s], {"w": w, "b": b})


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    w = RNG.normal(size=(3, 2)).astype(np.float32)
    w[:, 1] *= 10  # columns on different scales: per-channel matters
    b = np.array([0.5, -0.25], np.float32)
    feeds = [{"x": RNG.normal(size=(4, 3)).astype(np.float32) * (i + 1)} for i in range(3)]
    src = tmp / "float.onnx"
    onnx.save(_linear_graph(w, b), src)
    graph.calibrate(src, feeds, "minmax", 99.999, tmp / "ranges.json", tmp)
    graph.int8_qdq(src, tmp / "raw.onnx", ["mm"], tmp / "ranges.json", "minmax")
    raw = onnx.load(tmp / "raw.onnx")
    fixed = onnx.load(tmp / "raw.onnx")
    rewired = qdq.restrict_to_compute_inputs(fixed)
    return w, b, feeds, raw, fixed, rewired


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_int8_scales_and_zero_points_match_hand_computation(int8_tiny):
    w, b, feeds, _, model, _ = int8_tiny
    report = qdq.inspect_qdq(model)
    assert report.problems == [] and len(report.nodes) == 1 and report.nodes[0]["scheme"] == "w8a8"
    producer = {o: n for n in model.graph.node for o in n.output}
    mm = next(n for n in model.graph.node if n.name == "mm")
    act_dq, w_dq = producer[mm.input[0]], producer[mm.input[1]]
    inits = _inits(model)
    # activation: per tensor, symmetric over everything calibration saw: scale = max|x| / 127, zero point int8 0
    amax = max(np.abs(f["x"]).max() for f in feeds)
    np.testing.assert_allclose(inits[act_dq.input[1]], amax / 127, rtol=1e-6)
    assert inits[act_dq.input[2]].dtype == np.int8 and inits[act_dq.input[2]] == 0
    # weight: per output channel (MatMul [K, N] -> axis 1), scale = max|w[:, n]| / 127, q = round(w / scale)
    assert {a.name: a.i for a in w_dq.attribute}["axis"] == 1
    scale = np.abs(w).max(0) / 127
    np.testing.assert_allclose(inits[w_dq.input[1]], scale, rtol=1e-6)
    q = inits[w_dq.input[0]]
    assert q.dtype == np.int8 and np.array_equal(q, np.rint(w / scale).astype(np.int8))
    assert np.abs(q).max() == 127 and not inits[w_dq.input[2]].any()
    np.testing.assert_array_equal(inits["b"], b)  # the bias stays float, read by a plain Add


def test_int8_round_trip_error_bounds(int8_tiny):
    w, b, feeds, _, model, _ = int8_tiny
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    mm = next(n for n in model.graph.node if n.name == "mm")
    w_dq, act_dq = producer[mm.input[1]], producer[mm.input[0]]
    sw, sx = inits[w_dq.input[1]], float(inits[act_dq.input[1]])
    w_hat = inits[w_dq.input[0]].astype(np.float32) * sw
    assert (np.abs(w_hat - w) <= sw / 2 + 1e-7).all()  # rounding: at most half a step per weight
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in feeds:
        x = f["x"]
        got = sess.run(["y"], f)[0]
        ref = np.maximum(x @ w + b, 0)
        # |x w - x^ w^| <= sum_k |x_k| |w - w^| + |x - x^| |w^|, each rounding error at most half a step
        bound = np.abs(x) @ np.broadcast_to(sw / 2, w.shape) + (sx / 2) * np.abs(w_hat).sum(0)
        assert (np.abs(got - ref) <= bound + 1e-5).all()
        assert np.abs(got - ref).max() > 0  # it is quantized, not passed through


def test_residual_readers_get_the_float_tensor_back(int8_tiny):
    _, _, feeds, raw, fixed, rewired = int8_tiny
    side = lambda m: next(n for n in m.graph.node if n.name == "side")  # noqa: E731
    assert side(raw).input[0] != "x"  # ORT rewires every reader of x to the dequantized tensor
    problems = qdq.inspect_qdq(raw).problems
    assert any("feeds Sigmoid side" in p for p in problems), problems
    assert rewired == 1 and side(fixed).input[0] == "x"
    sess = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["s"], feeds[0])[0], 1 / (1 + np.exp(-feeds[0]["x"])), rtol=1e-6)


def _dq(name, x, scale, zp, axis=None, block=None):
    kw = {k: v for k, v in (("axis", axis), ("block_size", block)) if v is not None}
    return helper.make_node("DequantizeLinear", [x, scale, zp] if zp else [x, scale], [name + "_out"], name=name, **kw)


def _wrong(kind: str) -> onnx.ModelProto:
    """Tiny graphs with one layout TensorRT would not fuse each."""
    w = RNG.integers(-127, 127, (3, 2)).astype(np.int8)
    inits = {"w": w, "ws": np.full(2, 0.1, np.float32), "wz": np.zeros(2, np.int8), "xs": np.float32(0.05),
             "xz": np.int8(0), "xzu": np.uint8(128), "bias": np.array([3, -4], np.int32), "bs": np.float32(0.01)}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])
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
    return _model(nodes, [x], [y], inits, opset=21)


@pytest.mark.parametrize("kind, words", [
    ("asymmetric", "non-zero zero point"),
    ("asymmetric", "uint8 quantization"),
    ("axis", "not the output-channel axis 1"),
    ("quantized_output", "feeds Relu relu"),
    ("int32_bias", "int32 tensor 'bias' dequantized"),
    ("activation_only", "activation quantized but weight 'wf' is float"),
])
def test_checker_names_each_wrong_layout(kind, words):
    problems = qdq.inspect_qdq(_wrong(kind)).problems
    assert any(words in p for p in problems), problems


def test_checker_passes_the_right_layout():
    report = qdq.inspect_qdq(_wrong("none"))
    assert report.problems == [] and report.schemes == {"w8a8": 1}


def _reference_int4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Element by element: scale = max|w| / 7 over each block of a column, q = clamp(round(w / scale), -8, 7)."""
    k, n = w.shape
    q = np.zeros((k, n), np.int64)
    scales = np.zeros(((k + block - 1) // block, n))
    for j in range(n):
        for bi, start in enumerate(range(0, k, block)):
            col = [float(v) for v in w[start:start + block, j]]
            s = max(abs(v) for v in col) / 7
            scales[bi, j] = s
            for i, v in enumerate(col):
                q[start + i, j] = min(max(round(v / s), -8), 7)
    return q, scales


def test_int4_dequantized_weights_equal_reference_rounding():
    k, n, block = 40, 3, 16  # 40 = 16 + 16 + 8: the last block is short
    w = RNG.normal(size=(k, n)).astype(np.float32)
    w[3, 1] = 0.0
    q, scales = graph.int4_blocks(w, block)
    ref_q, ref_s = _reference_int4(w, block)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_allclose(scales, ref_s, rtol=1e-6)
    # through the graph: a blocked DequantizeLinear (opset 21) feeding the MatMul; x = I reads W back
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])
    m = _model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [a], [y], {"w": w})
    m = graph.int4_weight_only(m, [m.graph.node[0]], block)
    assert m.opset_import[0].version == graph.INT4_OPSET and {i.name for i in m.graph.initializer} == {"w_int4",
                                                                                                        "w_int4_scale"}
    assert next(i for i in m.graph.initializer if i.name == "w_int4").data_type == TensorProto.INT4
    onnx.checker.check_model(m, full_check=True)
    report = qdq.inspect_qdq(m)
    assert report.problems == [] and report.schemes == {"w4 weight-only": 1}
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": np.eye(k, dtype=np.float32)})[0]
    expect = ref_q * np.repeat(ref_s, block, axis=0)[:k]
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    assert got[3, 1] == 0.0 and (np.abs(got - w) <= np.repeat(ref_s, block, axis=0)[:k] / 2 + 1e-6).all()


def test_fp16_keeps_norms_and_io_in_fp32(llama_onnx, tmp_path):
    """Activations near 1000 (LLMs have "massive activations"): x^2 in the decomposed RMSNorm overflows
    FP16, so the norm's Pow -> ReduceMean chain must stay FP32 end to end."""
    tm = copy.deepcopy(llama_onnx[0])
    example = llama_onnx[3]
    with torch.no_grad():
        tm.model.model.embed_tokens.weight.mul_(1000 / tm.model.model.embed_tokens.weight.abs().max())
    proto = onnx_export.export(tm, example, tmp_path / "lm.onnx", tm.input_names, tm.output_names, opset=18)
    half = graph.to_fp16(proto)
    onnx.checker.check_model(half, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(half)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output,
                                                              *inferred.graph.input]}
    types.update({i.name: i.data_type for i in half.graph.initializer})
    producer = {o: n for n in half.graph.node for o in n.output}
    for node in half.graph.node:
        if node.op_type in ("Pow", "ReduceMean", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "ReduceMean":
            assert producer[node.input[0]].op_type == "Pow", node.name  # no float16 round trip in between
        if node.op_type == "MatMul" and node.input[1] in {i.name for i in half.graph.initializer}:
            assert types[node.input[1]] == TensorProto.FLOAT16, node.name
    assert onnx_export.io_spec(half)["outputs"][0]["dtype"] == "float32"
    onnx_export.save(half, tmp_path / "half.onnx", external=False)
    assert onnx_export.parity(tmp_path / "half.onnx", tm, tm.input_names, [example]).max_rel_err < 0.02
