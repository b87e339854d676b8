"""w8a16: per-channel INT8 weights against an element-by-element reference, through ONNX Runtime in
FP16; the layout the Q/DQ checker and TensorRT readiness accept; a whole run on a tiny encoder."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from core.events import Events
from export import qdq, tensorrt
from export.formats import FormatContext, Rewritten, int8, w8a16
from pipeline.runner import run

from ...conftest import text_recipe, write_recipe
from ..tiny import linear_graph, model, vi

RNG = np.random.default_rng(0)


def _reference(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Element by element: scale = max|w| / 127 over each output channel, q = clamp(round(w / scale), -127, 127)."""
    wc = w if axis == 1 else w.T  # columns are the output channels
    k, n = wc.shape
    q, scales = np.zeros((k, n), np.int64), np.zeros(n)
    for j in range(n):
        col = [float(v) for v in wc[:, j]]
        s = max(abs(v) for v in col) / 127 or 1.0
        scales[j] = s
        for i, v in enumerate(col):
            q[i, j] = min(max(round(v / s), -127), 127)
    return (q, scales) if axis == 1 else (q.T, scales)


def _apply(m: onnx.ModelProto, nodes: dict, tmp_path) -> Rewritten:
    fmt = w8a16.W8A16(w8a16.W8A16.Args(format="w8a16"))
    return fmt.apply(m, nodes, FormatContext(tmp_path / "float.onnx", tmp_path, tmp_path, Events(None)))


def test_int8_per_channel_equals_the_reference_and_keeps_zeros():
    w = RNG.normal(size=(24, 5)).astype(np.float32)
    w[:, 3] = 0.0  # a pruned output channel: scale 1, all zeros
    w[7, 1] = 0.0
    q, scale = int8.int8_per_channel(w, axis=1)
    ref_q, ref_s = _reference(w, 1)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_allclose(scale, ref_s, rtol=1e-6)
    assert scale[3] == 1.0 and (q[:, 3] == 0).all() and q[7, 1] == 0 and np.abs(q).max() == 127
    q_nk, s_nk = int8.int8_per_channel(w.T, axis=0)  # Gemm transB=1 layout [N, K]
    np.testing.assert_array_equal(q_nk, q.T)
    np.testing.assert_allclose(s_nk, scale)


def test_graph_reads_int8_weights_in_fp16_and_passes_the_checker(tmp_path):
    k, n = 16, 3
    w, b = RNG.normal(size=(k, n)).astype(np.float32), RNG.normal(size=n).astype(np.float32)
    out = _apply(linear_graph(w, b, rows=k), {"lin": "mm"}, tmp_path).model
    onnx.checker.check_model(out, full_check=True)
    inits = {i.name: i for i in out.graph.initializer}
    assert inits["w_int8"].data_type == TensorProto.INT8 and inits["w_int8_scale"].data_type == TensorProto.FLOAT16
    assert inits["b"].data_type == TensorProto.FLOAT16 and "w" not in inits
    assert out.opset_import[0].version == 19 and out.ir_version == 10
    mm = next(nd for nd in out.graph.node if nd.op_type == "MatMul")
    assert mm.input[1] == "w_int8_dq"
    report = qdq.inspect_qdq(out)
    assert report.problems == [] and report.schemes == {"w8 weight-only": 1}
    # x = I reads the dequantized weight back (in fp16), + bias, through relu
    y = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": np.eye(k, dtype=np.float32)})[0]
    ref_q, ref_s = _reference(w, 1)
    deq = (ref_q * ref_s[None, :]).astype(np.float16).astype(np.float32)
    expect = np.maximum(deq + b.astype(np.float16).astype(np.float32), 0)
    np.testing.assert_allclose(y, expect, rtol=2e-3, atol=2e-3)
    assert np.abs(deq - w).max() <= ref_s.max() / 2 + 1e-3


def test_gemm_scales_run_along_its_output_axis_and_a_shared_weight_is_quantized_once(tmp_path):
    k, n = 8, 4
    w_nk = RNG.normal(size=(n, k)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["a", "w"], ["y1"], name="g1", transB=1),
             helper.make_node("Gemm", ["a", "w"], ["y2"], name="g2", transB=1)]
    m = model(nodes, [vi("a", [k, k])], [vi("y1", [k, n]), vi("y2", [k, n])], {"w": w_nk})
    out = _apply(m, {"l1": "g1", "l2": "g2"}, tmp_path).model
    dqs = [nd for nd in out.graph.node if nd.op_type == "DequantizeLinear"]
    assert len(dqs) == 1 and {a.name: a.i for a in dqs[0].attribute} == {"axis": 0}
    scale = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "w_int8_scale"))
    np.testing.assert_allclose(scale, _reference(w_nk, 0)[1], rtol=1e-3)
    assert qdq.inspect_qdq(out).problems == []


def test_tensorrt_readiness_per_target(tmp_path):
    """INT8 weight-only is a DequantizeLinear every target's parser takes; it needs opset 19 (fp16 scales),
    so JetPack 6's TensorRT 10.3 accepts it and JetPack 5's 8.5 (opset 17) does not."""
    out = _apply(linear_graph(RNG.normal(size=(8, 4)).astype(np.float32), np.zeros(4, np.float32)), {"l": "mm"},
                 tmp_path).model
    assert tensorrt.check(out, "jetson-orin-jp6").ok and tensorrt.check(out, "x86-trt10").ok
    jp5 = tensorrt.check(out, "jetson-orin-jp5")
    assert not jp5.ok and "opset 19" in jp5.summary()


def test_args_declarations_and_details(tmp_path):
    fmt = w8a16.W8A16(w8a16.W8A16.Args(format="w8a16"))
    assert fmt.tolerance == 0.1 and not fmt.calibration and fmt.opset == 19 and fmt.ort_disabled_optimizers == ()
    assert fmt.describe() == "w8a16: int8 weight-only per channel, fp16 activations"
    with pytest.raises(ValidationError, match="group_size"):
        w8a16.W8A16.Args(format="w8a16", group_size=64)
    details = _apply(linear_graph(RNG.normal(size=(4, 2)).astype(np.float32), np.zeros(2, np.float32)),
                     {"l": "mm"}, tmp_path).details
    assert details == {"weights": "int8 symmetric per output channel, max|w| / 127", "activations": "float16",
                       "float_dtype": "float16", "kept_fp32_ops": []}


def test_a_tiny_encoder_run_keeps_parity_and_its_evaluation(bert_dir, tmp_path):
    stages = [{"type": "export"}, {"type": "quantize", "format": "w8a16"}, {"type": "evaluate"}]
    out = run(write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages)), output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    q = m["onnx"]["quantization"]
    assert q["format"] == "w8a16" and q["layers"] == 12 and q["checker"]["schemes"] == {"w8 weight-only": 12}
    assert q["parity"]["max_rel_err"] <= 0.1 and m["onnx"]["tensorrt"]["ok"]
    assert m["evaluation"]["comparison"]["mean_cosine"] > 0.99
    assert m["evaluation"]["size"]["compressed"]["onnx_bytes"] < m["evaluation"]["size"]["dense"]["onnx_bytes"] * 0.55
