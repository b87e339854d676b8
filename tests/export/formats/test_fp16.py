"""fp16: norms, softmax and I/O stay FP32 on an exported Llama with huge activations; the Cast round
trips between two FP32 ops are dropped; the format's arguments."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from pydantic import ValidationError

from core.events import Events
from export import onnx as onnx_export
from export.formats import FormatContext, fp16
from export.graph import tidy

from ..tiny import model, vi


def test_fp16_keeps_norms_and_io_in_fp32(llama_onnx, tmp_path):
    """Activations near 1000 (LLMs have "massive activations"): x^2 in the decomposed RMSNorm overflows
    FP16, so the norm's Pow -> ReduceMean chain must stay FP32 end to end."""
    tm = copy.deepcopy(llama_onnx[0])
    example = llama_onnx[3]
    with torch.no_grad():
        tm.model.model.embed_tokens.weight.mul_(1000 / tm.model.model.embed_tokens.weight.abs().max())
    proto = onnx_export.export(tm, example, tmp_path / "lm.onnx", tm.input_names, tm.output_names, opset=18)
    half = fp16.to_fp16(proto)
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
    assert half.ir_version == onnx_export.IR_VERSION
    onnx_export.save(half, tmp_path / "half.onnx", external=False)
    assert onnx_export.parity(tmp_path / "half.onnx", tm, tm.input_names, [example]).max_rel_err < 0.02


def _cast(x, y, to, name):
    return helper.make_node("Cast", [x], [y], to=to, name=name)


def test_round_trip_between_fp32_ops_is_dropped():
    """Pow -> Cast(fp16) -> Cast(fp32) -> ReduceMean reads Pow directly; a round trip after a
    float16 op (Relu) stays, and the casts nobody reads any more are removed."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"], name="pow"),
             _cast("p", "p16", TensorProto.FLOAT16, "down"), _cast("p16", "p32", TensorProto.FLOAT, "back"),
             helper.make_node("ReduceMean", ["p32"], ["m"], name="mean", keepdims=1),
             _cast("x", "x16", TensorProto.FLOAT16, "x_down"), helper.make_node("Relu", ["x16"], ["r16"], name="relu"),
             _cast("r16", "r32", TensorProto.FLOAT, "r_back"), helper.make_node("Softmax", ["r32"], ["s"], name="sm")]
    m = model(nodes, [vi("x", [2, 4])], [vi("m", [2, 1]), vi("s", [2, 4])], {"two": np.float32(2)})
    graph = ir.from_proto(m)
    fp16._drop_cast_round_trips(graph.graph, set(fp16.FP32_OPS))
    tidy(graph)
    readers = {n.name: [v.name for v in n.inputs] for n in graph.graph}
    assert readers["mean"] == ["p"] and "down" not in readers and "back" not in readers
    assert readers["sm"] == ["r32"] and readers["r_back"] == ["r16"]


def test_format_converts_the_whole_graph(tmp_path):
    fmt = fp16.Fp16(fp16.Fp16.Args(format="fp16"))
    assert (fmt.tolerance, fmt.opset, fmt.calibration, fmt.ort_disabled_optimizers, fmt.describe()) == \
        (0.05, 0, False, (), "fp16")
    for stray in ({"targets": ["re:.*"]}, {"ignore": ["x"]}, {"group_size": 64}, {"float16": True}):
        with pytest.raises(ValidationError, match=next(iter(stray))):
            fp16.Fp16.Args(format="fp16", **stray)
    w = np.full((4, 4), 0.5, np.float32)
    m = model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
               helper.make_node("Softmax", ["h"], ["y"], name="sm")], [vi("x", [2, 4])], [vi("y", [2, 4])], {"w": w})
    out = fmt.apply(m, {}, FormatContext(tmp_path / "float.onnx", tmp_path, tmp_path, Events(None)))
    assert out.details == {"kept_fp32_ops": ["Softmax"]}
    assert [i.data_type for i in out.model.graph.initializer] == [TensorProto.FLOAT16]
