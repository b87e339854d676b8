"""Scales a stage chose before export (gptq, FormatContext.scales) reach the int4, w8a16 and int8
graphs as given: the stored integers are w / scale, never a second rounding with the format's own
max|w| scales; weights that left the grid are refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from core.errors import StageFailed
from core.events import Events
from export.formats import FormatContext, int4, int8, w8a16

from ..tiny import linear_graph, model, vi

RNG = np.random.default_rng(0)


def _on_grid(k: int, n: int, width: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, N] MatMul weight on the grid of per-(group, column) scales [N, groups], whose largest
    level is below ``high`` in every group: the format's own scales (max|w| / high) would differ."""
    groups = -(-k // width)
    scales = RNG.uniform(0.01, 0.1, size=(n, groups)).astype(np.float32)
    q = RNG.integers(-high + 2, high - 1, size=(k, n)).astype(np.float32)
    w = q * np.repeat(scales.T, width, axis=0)[:k]
    return w.astype(np.float32), scales


def _initializer(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == name))


def _context(tmp_path, scales, feeds=()) -> FormatContext:
    return FormatContext(tmp_path / "float.onnx", tmp_path, tmp_path, Events(None), list(feeds), scales)


def _matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    return model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], [vi("a", [k, k])], [vi("y", [k, n])],
                 {"w": w})


def test_int4_stores_the_given_scales_and_reads_the_weights_back_exactly(tmp_path):
    w, scales = _on_grid(40, 3, 16, 7)  # 40 = 16 + 16 + 8: a short last group
    fmt = int4.Int4(int4.Int4.Args(format="int4", group_size=16, partial_groups=True))
    out = fmt.apply(_matmul(w), {"lin": "mm"}, _context(tmp_path, {"mm": scales}))
    assert out.details["scale"] == "max|w| / 7 per group of K; chosen by gptq for 1 layers"
    np.testing.assert_array_equal(_initializer(out.model, "w_int4_scale"), scales.T)
    q = _initializer(out.model, "w_int4").astype(np.float32)
    np.testing.assert_array_equal(q, np.rint(w / np.repeat(scales.T, 16, axis=0)[:40]))
    assert not np.array_equal(int4.int4_blocks(w, 16)[1], scales.T)  # its own scales would differ
    got = ort.InferenceSession(out.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": np.eye(40, dtype=np.float32)})[0]
    np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)  # x = I reads the weight back (MLAS: not bit-exact)


def test_w8a16_stores_the_given_scales(tmp_path):
    w, scales = _on_grid(16, 3, 16, 127)
    out = w8a16.W8A16(w8a16.W8A16.Args(format="w8a16")).apply(_matmul(w), {"lin": "mm"},
                                                               _context(tmp_path, {"mm": scales}))
    assert out.details["weights"].endswith("; scales chosen by gptq for 1 layers")
    np.testing.assert_array_equal(_initializer(out.model, "w_int8_scale"), scales[:, 0].astype(np.float16))
    np.testing.assert_array_equal(_initializer(out.model, "w_int8"), np.rint(w / scales[:, 0]))


@pytest.mark.parametrize("float16", [False, True])
def test_int8_replaces_onnx_runtimes_weight_rounding_with_the_given_scales(tmp_path, float16):
    w, scales = _on_grid(16, 3, 16, 127)
    float_graph = linear_graph(w, np.zeros(3, np.float32))
    onnx.save(float_graph, tmp_path / "float.onnx")
    feeds = [{"x": RNG.normal(size=(4, 16)).astype(np.float32)} for _ in range(4)]
    fmt = int8.Int8(int8.Int8.Args(format="int8", float16=float16))
    out = fmt.apply(float_graph, {"lin": "mm"}, _context(tmp_path, {"mm": scales}, feeds))
    assert out.details["weights"] == "int8 symmetric per output channel; scales chosen by gptq for 1 layers"
    dtype = np.float16 if float16 else np.float32
    np.testing.assert_array_equal(_initializer(out.model, "w_scale"), scales[:, 0].astype(dtype))
    np.testing.assert_array_equal(_initializer(out.model, "w_quantized"), np.rint(w / scales[:, 0]))
    own = fmt.apply(float_graph, {"lin": "mm"}, _context(tmp_path, {}, feeds))  # ONNX Runtime's max|w| / 127
    assert not np.array_equal(_initializer(own.model, "w_scale"), _initializer(out.model, "w_scale"))


def test_weights_off_the_given_grid_or_scales_of_another_shape_are_refused(tmp_path):
    w, scales = _on_grid(32, 2, 16, 7)
    moved = w.copy()
    moved[3, 1] += 0.3 * scales[1, 0]
    fmt = int4.Int4(int4.Int4.Args(format="int4", group_size=16))
    with pytest.raises(StageFailed, match=r"int4: the weights are not on the grid .* \(w / scale is 0.3 from an "
                                          r"integer.*a stage changed them after gptq"):
        fmt.apply(_matmul(moved), {"lin": "mm"}, _context(tmp_path, {"mm": scales}))
    with pytest.raises(StageFailed, match=r"given int4 scales \(1, 2\) do not fit a \[32, 2\] weight in blocks of 16"):
        fmt.apply(_matmul(w), {"lin": "mm"}, _context(tmp_path, {"mm": scales[:, :1]}))
    big = w.copy()
    big[0, 0] = 9 * scales[0, 0]
    with pytest.raises(StageFailed, match=r"range \[.*, 9\] of \[-8, 7\]"):
        fmt.apply(_matmul(big), {"lin": "mm"}, _context(tmp_path, {"mm": scales}))
    with pytest.raises(StageFailed, match="given int8 scales"):
        int8.int8_per_channel(w, 1, scales[:1, 0])
