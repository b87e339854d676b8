"""Tiny hand-built ONNX graphs for the export tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import onnx as onnx_export


def vi(name: str, dims: list, t: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, dims)


def model(nodes, inputs, outputs, inits: dict[str, np.ndarray] | None = None, opset: int = 18) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = onnx_export.IR_VERSION
    return m


def linear_graph(w: np.ndarray, b: np.ndarray, rows: int = 4) -> onnx.ModelProto:
    """y = relu(x @ w + b): one compute op with a float bias Add and a non-compute reader of x."""
    k, n = w.shape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
             helper.make_node("Add", ["xw", "b"], ["xwb"], name="bias"),
             helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["s"], name="side")]  # a non-compute reader of the activation
    return model(nodes, [vi("x", [rows, k])], [vi("y", [rows, n]), vi("s", [rows, k])], {"w": w, "b": b})
