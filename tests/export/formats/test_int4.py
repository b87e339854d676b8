"""int4: blocks and scales against an element-by-element reference, through ONNX Runtime; the Gemm
layout and shared weights; the format's plan-time check and what it records."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from core.errors import RecipeError
from core.events import Events
from export import qdq
from export.formats import FormatContext, int4

from ..tiny import model, vi

RNG = np.random.default_rng(0)


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


def _run(m: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_int4_dequantized_weights_equal_reference_rounding():
    k, n, block = 40, 3, 16  # 40 = 16 + 16 + 8: the last block is short
    w = RNG.normal(size=(k, n)).astype(np.float32)
    w[3, 1] = 0.0
    q, scales = int4.int4_blocks(w, block)
    ref_q, ref_s = _reference_int4(w, block)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_allclose(scales, ref_s, rtol=1e-6)
    # through the graph: a blocked DequantizeLinear (opset 21) feeding the MatMul; x = I reads W back
    m = model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [vi("a", [k, k])], [vi("y", [k, n])],
              {"w": w})
    m, widths = int4.int4_weight_only(m, ["mm"], block)
    assert widths == [k] and m.ir_version == 10
    assert m.opset_import[0].version == int4.INT4_OPSET and {i.name for i in m.graph.initializer} == {"w_int4",
                                                                                                       "w_int4_scale"}
    assert next(i for i in m.graph.initializer if i.name == "w_int4").data_type == TensorProto.INT4
    onnx.checker.check_model(m, full_check=True)
    report = qdq.inspect_qdq(m)
    assert report.problems == [] and report.schemes == {"w4 weight-only": 1}
    got = _run(m, {"a": np.eye(k, dtype=np.float32)})
    expect = ref_q * np.repeat(ref_s, block, axis=0)[:k]
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    assert got[3, 1] == 0.0 and (np.abs(got - w) <= np.repeat(ref_s, block, axis=0)[:k] / 2 + 1e-6).all()


def test_gemm_blocks_run_along_its_k_axis_and_a_shared_weight_is_quantized_once():
    """Gemm with transB=1 stores [N, K]: blocks along axis 1. Two Gemms read the same weight; a third
    node not named keeps reading the float weight."""
    k, n, block = 32, 2, 16
    w_nk = RNG.normal(size=(n, k)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["a", "w"], ["y1"], name="g1", transB=1),
             helper.make_node("Gemm", ["a", "w"], ["y2"], name="g2", transB=1),
             helper.make_node("Gemm", ["a", "w"], ["y3"], name="g3", transB=1)]
    m = model(nodes, [vi("a", [k, k])], [vi(y, [k, n]) for y in ("y1", "y2", "y3")], {"w": w_nk})
    out, widths = int4.int4_weight_only(m, ["g1", "g2"], block)
    assert widths == [k]
    dqs = [nd for nd in out.graph.node if nd.op_type == "DequantizeLinear"]
    assert len(dqs) == 1 and {a.name: a.i for a in dqs[0].attribute} == {"axis": 1, "block_size": block}
    readers = {nd.name: nd.input[1] for nd in out.graph.node if nd.op_type == "Gemm"}
    assert readers == {"g1": "w_int4_dq", "g2": "w_int4_dq", "g3": "w"}
    ref_q, ref_s = _reference_int4(w_nk.T, block)
    scale = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "w_int4_scale"))
    np.testing.assert_allclose(scale, ref_s.T, rtol=1e-6)
    y1, y2, y3 = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": np.eye(k, dtype=np.float32)})
    np.testing.assert_allclose(y1, ref_q * np.repeat(ref_s, block, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(y3, w_nk.T, rtol=1e-6)


def test_group_size_must_divide_the_input_width_unless_partial_groups():
    strict = int4.Int4(int4.Int4.Args(format="int4", group_size=64))
    strict.check_layers({"a": 128, "b": 256}, "stages[1]")
    with pytest.raises(RecipeError) as e:
        strict.check_layers({"a": 128, "b": 96, "c": 80}, "stages[1]")
    assert e.value.field == "stages[1].group_size"
    assert e.value.message.startswith("group_size 64 does not divide the input width 96 of b (2 layers)")
    int4.Int4(int4.Int4.Args(format="int4", group_size=64, partial_groups=True)).check_layers({"b": 96}, "stages[1]")


def test_apply_records_partial_groups(tmp_path):
    w = RNG.normal(size=(40, 3)).astype(np.float32)
    m = model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [vi("a", [2, 40])], [vi("y", [2, 3])],
              {"w": w})
    fmt = int4.Int4(int4.Int4.Args(format="int4", group_size=16, partial_groups=True))
    out = fmt.apply(m, {"lin": "mm"}, FormatContext(tmp_path / "float.onnx", tmp_path, tmp_path, Events(None)))
    assert out.details == {"group_size": 16, "symmetric": True, "scale": "max|w| / 7 per group of K",
                           "input_widths": [40], "partial_groups": {"40": "last group has 8 weights"}}
    assert qdq.inspect_qdq(out.model).schemes == {"w4 weight-only": 1}


def test_args_and_declarations():
    fmt = int4.Int4(int4.Int4.Args(format="int4"))
    assert (fmt.args.group_size, fmt.args.partial_groups, fmt.tolerance, fmt.opset, fmt.calibration) == \
        (128, False, 0.5, 21, False)
    assert fmt.describe() == "int4 weight-only, group 128" and fmt.ort_disabled_optimizers == ()
    with pytest.raises(ValidationError, match="greater than or equal to 16"):
        int4.Int4.Args(format="int4", group_size=8)
    with pytest.raises(ValidationError, match="calibrate_method"):
        int4.Int4.Args(format="int4", calibrate_method="entropy")
