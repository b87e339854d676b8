"""int8: Q/DQ scales by hand on a tiny graph, error bounds, float readers restored, and the format's
own arguments and rewrite (details, calibration ranges, the fp16 variant)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from pydantic import ValidationError

from core.events import Events
from export import qdq
from export.formats import FormatContext, int8

from ..tiny import linear_graph

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    w = RNG.normal(size=(3, 2)).astype(np.float32)
    w[:, 1] *= 10  # columns on different scales: per-channel matters
    b = np.array([0.5, -0.25], np.float32)
    feeds = [{"x": RNG.normal(size=(4, 3)).astype(np.float32) * (i + 1)} for i in range(3)]
    src = tmp / "float.onnx"
    onnx.save(linear_graph(w, b), src)
    int8.calibrate(src, feeds, "minmax", 99.999, tmp / "ranges.json", tmp)
    int8.int8_qdq(src, tmp / "raw.onnx", ["mm"], tmp / "ranges.json", "minmax")
    raw = onnx.load(tmp / "raw.onnx")
    fixed = ir.from_proto(raw)
    rewired = qdq.restrict_to_compute_inputs(fixed)
    return w, b, feeds, raw, ir.to_proto(fixed), rewired


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
    def side(m):
        return next(n for n in m.graph.node if n.name == "side")
    assert side(raw).input[0] != "x"  # ORT rewires every reader of x to the dequantized tensor
    problems = qdq.inspect_qdq(raw).problems
    assert any("feeds Sigmoid side" in p for p in problems), problems
    assert rewired == 1 and side(fixed).input[0] == "x"
    sess = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["s"], feeds[0])[0], 1 / (1 + np.exp(-feeds[0]["x"])), rtol=1e-6)


@pytest.mark.parametrize("float16", [False, True])
def test_apply_records_what_it_did(tmp_path, float16):
    w = RNG.normal(size=(3, 2)).astype(np.float32)
    src = tmp_path / "float.onnx"
    float_graph = linear_graph(w, np.zeros(2, np.float32))
    onnx.save(float_graph, src)
    (tmp_path / "work").mkdir()
    feeds = [{"x": RNG.normal(size=(4, 3)).astype(np.float32)} for _ in range(10)]  # two chunks of 8
    fmt = int8.Int8(int8.Int8.Args(format="int8", calibrate_method="percentile", percentile=99.0, float16=float16))
    out = fmt.apply(float_graph, {"lin": "mm"}, FormatContext(src, tmp_path, tmp_path / "work", Events(None), feeds))
    assert out.details == {"float_readers_restored": 1,
                           "calibration": {"method": "percentile", "samples": 10, "shape": [4, 3],
                                           "ranges": "calibration_ranges.json", "percentile": 99.0},
                           "activations": "int8 symmetric per tensor", "weights": "int8 symmetric per output channel",
                           "float_dtype": "float16" if float16 else "float32"}
    ranges = json.loads((tmp_path / "calibration_ranges.json").read_text())
    assert sorted(ranges["data"]) == ["x", "xw"]  # the MatMul's input and output
    assert out.model.ir_version == 10 and qdq.inspect_qdq(out.model).schemes == {"w8a8": 1}
    scales = {i.data_type for i in out.model.graph.initializer if i.name.endswith("_scale")}
    assert scales == {TensorProto.FLOAT16 if float16 else TensorProto.FLOAT}
    assert next(o.version for o in out.model.opset_import if o.domain == "") == (19 if float16 else 18)
    assert fmt.opset == (19 if float16 else 0)


def test_args_and_declarations():
    args = int8.Int8.Args(format="int8")
    assert (args.calibrate_method, args.percentile, args.float16, args.targets, args.ignore, args.rtol) == \
        ("minmax", 99.999, False, ["re:.*"], [], None)
    fmt = int8.Int8(args)
    assert fmt.tolerance == 0.25 and fmt.calibration and fmt.describe() == "int8 Q/DQ, minmax"
    assert int8.Int8(int8.Int8.Args(format="int8", float16=True, rtol=0.3)).tolerance == 0.3
    assert fmt.ort_disabled_optimizers == ("MatMulAddFusion", "CommonSubexpressionElimination")
    with pytest.raises(ValidationError, match="percentile only applies to calibrate_method 'percentile'"):
        int8.Int8.Args(format="int8", percentile=99.0)
    with pytest.raises(ValidationError, match="group_size"):
        int8.Int8.Args(format="int8", group_size=64)
