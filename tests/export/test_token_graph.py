"""The checks on an exported graph with a token selector: every TopK's K is a constant in the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import onnx as onnx_export
from export import tensorrt
from export import token_graph as graph


def _topk_graph(k_from_input: bool, extra_op: str | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    inputs = [x]
    nodes, inits = [], [numpy_helper.from_array(np.array([3], np.int64), "k")]
    if k_from_input:
        nodes.append(helper.make_node("Shape", ["x"], ["shape"], start=1))
        nodes.append(helper.make_node("Div", ["shape", "two"], ["k"]))
        inits = [numpy_helper.from_array(np.array([2], np.int64), "two")]
    nodes.append(helper.make_node("TopK", ["x", "k"], ["v", "i"]))
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("i", TensorProto.INT64, None)]
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["x"], ["nz"]))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, None))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = onnx_export.IR_VERSION
    return m


def test_topk_constants_and_readiness_flag_a_computed_k():
    assert graph.topk_constants(_topk_graph(False)) == [3]
    assert graph.topk_constants(_topk_graph(True)) == [None]
    assert tensorrt.check(_topk_graph(False), "jetson-orin-jp6").ok
    errors = [str(f) for f in tensorrt.check(_topk_graph(True), "jetson-orin-jp6").errors]
    assert any("TopK" in e and "K" in e for e in errors), errors
