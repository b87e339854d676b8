"""ONNX export: static shapes, IR version, parity, and reading weights back out of the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import inspect as onnx_inspect
from export import onnx as onnx_export
from models.spec import ModelSpec
from tasks import TaskModel


@pytest.fixture(scope="module")
def bert_export(bert_dir, tmp_path_factory):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(bert_dir).eval()
    tm = TaskModel(model, ModelSpec(source=str(bert_dir), task="feature-extraction")).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    proto = onnx_export.export(tm, (ids, mask), path, tm.input_names, tm.output_names, opset=18)
    return tm, path, proto, (ids, mask)


def test_static_io_and_versions(bert_export):
    tm, path, proto, _ = bert_export
    spec = onnx_export.io_spec(onnx.load(path))
    assert [d["name"] for d in spec["inputs"]] == ["input_ids", "attention_mask"]
    assert [d["name"] for d in spec["outputs"]] == ["embedding", "last_hidden_state"]
    assert spec["outputs"][0]["shape"] == [2, 32] and spec["outputs"][1]["shape"] == [2, 12, 32]
    assert onnx_export.static_shape_problems(proto) == []
    assert proto.ir_version == onnx_export.IR_VERSION and proto.opset_import[0].version == 18


def test_no_checkout_paths_in_the_graph(bert_export):
    """The exporter's stack traces name this checkout's files; the artifact must not depend on where it ran."""
    _, path, _, _ = bert_export
    data = path.read_bytes()
    assert onnx_export.STACK_TRACE.encode() not in data
    assert b"tasks/model.py" not in data and b"site-packages" not in data
    assert any(p.key == "namespace" for n in onnx.load(path).graph.node for p in n.metadata_props)


def test_parity_with_padding(bert_export):
    tm, path, _, example = bert_export
    par = onnx_export.parity(path, tm, tm.input_names, [example])
    assert par.max_rel_err < 1e-5 and par.samples == 2
    sess = onnx_export.session(path)
    a = sess.run(None, {"input_ids": example[0].numpy(), "attention_mask": example[1].numpy()})
    b = sess.run(None, {"input_ids": example[0].numpy(), "attention_mask": example[1].numpy()})
    assert np.array_equal(a[0], b[0])  # no dropout left active in the graph


def test_linear_weights_map_to_torch_modules_input_first(bert_export):
    tm, _, proto, _ = bert_export
    weights = onnx_inspect.linear_weights(proto)
    name = "encoder.layer.1.intermediate.dense"
    torch_w = tm.model.get_submodule(name).weight.detach().numpy()
    assert weights[name].shape == (torch_w.shape[1], torch_w.shape[0])
    np.testing.assert_array_equal(weights[name], torch_w.T)
    assert len(weights) == 2 * 6  # six Linears per block


def test_nm_violations():
    w = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=np.float32)  # [K=4, N=4]
    assert onnx_inspect.nm_violations(w, 2, 4) == 0
    w[2, 0] = 5.0  # column 0 now has 3 non-zeros in its group of 4 along K
    assert onnx_inspect.nm_violations(w, 2, 4) == 1


def _tiny_graph(dims_a, ir=onnx_export.IR_VERSION):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, dims_a)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims_a[0], 4])
    b = numpy_helper.from_array(np.ones((3, 4), np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g", [a], [y], [b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = ir
    return m


def test_flops_and_dynamic_dims():
    assert onnx_inspect.matmul_flops(_tiny_graph([2, 3])) == 2 * 2 * 3 * 4
    assert onnx_export.static_shape_problems(_tiny_graph([2, 3])) == []
    assert onnx_export.static_shape_problems(_tiny_graph(["batch", 3])) == ["input 'a' dim 0 is batch",
                                                                            "output 'y' dim 0 is batch"]


def test_rename_io_avoids_internal_name_clash():
    m = _tiny_graph([2, 3])
    m.graph.node.append(helper.make_node("Relu", ["y"], ["embedding"]))
    m.graph.node.append(helper.make_node("Identity", ["embedding"], ["out"]))
    m.graph.output[0].name = "out"
    m.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]))
    onnx_export.rename_io(m, ["x"], ["embedding"])
    onnx.checker.check_model(m)
    assert [o.name for o in m.graph.output] == ["embedding"] and m.graph.input[0].name == "x"
    assert m.graph.node[1].output[0] == "embedding__internal"


def test_llama_export_parity(llama_onnx):
    tm, path, proto, example = llama_onnx
    assert onnx_export.io_spec(proto)["outputs"][0]["shape"] == [1, 16, 30522]
    assert onnx_export.parity(path, tm, tm.input_names, [example]).max_rel_err < 1e-4


def test_external_data_layout_loads_in_onnx_runtime(bert_export, tmp_path):
    tm, _, proto, example = bert_export
    path = tmp_path / "big.onnx"
    onnx_export.save(proto, path, external=True)
    assert (tmp_path / "big.onnx.data").stat().st_size > path.stat().st_size
    assert onnx_export.file_bytes(path) > (tmp_path / "big.onnx.data").stat().st_size
    assert onnx_export.parity(path, tm, tm.input_names, [example]).max_rel_err < 1e-5
