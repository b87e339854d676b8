"""Graph edits through onnx_ir: constants, sorting and dead-code removal (subgraphs too), the IR
version of what comes out, opset upgrades that keep torch scopes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from export import graph
from export import onnx as onnx_export

from .tiny import model, vi


def test_constants_from_initializers_and_constant_nodes():
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.INT64, [1], [7])),
             helper.make_node("Constant", [], ["f"], value_float=1.5),
             helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node("Mul", ["s", "f"], ["y"])]
    g = ir.from_proto(model(nodes, [vi("x", [2])], [vi("y", [2])], {"w": np.array([1, 2], np.float32)})).graph
    values = {v.name: v for n in g for v in (*n.inputs, *n.outputs)}
    assert graph.constant(values["c"]).tolist() == [7] and graph.constant_type(values["c"]) == TensorProto.INT64
    assert graph.constant(values["f"]) == np.float32(1.5)
    assert graph.constant(values["w"]).tolist() == [1, 2] and graph.constant_type(values["w"]) == TensorProto.FLOAT
    assert graph.constant(values["x"]) is None and graph.constant(values["s"]) is None and graph.constant(None) is None


def test_tidy_sorts_and_drops_dead_nodes_in_subgraphs_too():
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["dead"], name="dead_in_branch"),
                              helper.make_node("Relu", ["x"], ["t"], name="relu")], "then", [], [vi("t", [2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="id")], "else", [], [vi("e", [2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if"),
             helper.make_node("Greater", ["xs", "zero"], ["cond"], name="gt"),  # read before it is produced
             helper.make_node("ReduceSum", ["x"], ["xs"], name="sum", keepdims=0),
             helper.make_node("Sigmoid", ["x"], ["unused"], name="dead")]
    m = ir.from_proto(model(nodes, [vi("x", [2])], [vi("y", [2])],
                            {"zero": np.float32(0), "nobody": np.ones(3, np.float32)}))
    graph.tidy(m)
    out = graph.to_proto(m)
    assert [n.name for n in out.graph.node] == ["sum", "gt", "if"]
    branches = {a.name: [n.name for n in a.g.node] for a in out.graph.node[2].attribute}
    assert branches == {"then_branch": ["relu"], "else_branch": ["id"]}
    assert [i.name for i in out.graph.initializer] == ["zero"] and out.ir_version == onnx_export.IR_VERSION
    onnx.checker.check_model(out, full_check=True)


def test_upgrade_opset_keeps_scopes_and_the_ir_version():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'model.lin', 'linear']")
    m = model([node], [vi("x", [2, 3])], [vi("y", [2, 4])], {"w": np.ones((3, 4), np.float32)})
    up = graph.upgrade_opset(m, 21)
    assert graph.opset(up) == 21 and up.ir_version == onnx_export.IR_VERSION
    assert {p.key: p.value for p in up.graph.node[0].metadata_props} == {
        "pkg.torch.onnx.name_scopes": "['', 'model.lin', 'linear']"}
    assert graph.upgrade_opset(up, 19) is up
