"""The one gate: logits parity for float graphs; for quantized causal LMs the task's perplexity ratio
and top-1 token agreement against the float model, which a graph with wrong scales fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from core.errors import StageFailed
from core.events import Events
from export import onnx as onnx_export
from export.formats.int4 import int4_weight_only
from export.gate import GateGraph, check_fidelity, gate
from export.inspect import linear_nodes
from export.spec import TensorRTSpec
from tasks import TASKS

CAUSAL = TASKS["causal-lm"]


def _windows(n: int = 2) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 30000, (1, 16), generator=g),) for _ in range(n)]


def _int4(proto: onnx.ModelProto, scale_factor: float = 1.0) -> onnx.ModelProto:
    """Every block Linear of the tiny Llama in int4 g16; ``scale_factor`` breaks the graph on purpose."""
    nodes = [n.name for name, n in linear_nodes(proto).items() if name.startswith("model.layers.")]
    out, _ = int4_weight_only(proto, nodes, 16)
    for init in out.graph.initializer:
        if init.name.endswith("_int4_scale"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale_factor), init.name))
    return out


def _rows(tm, model: onnx.ModelProto, path) -> tuple[onnx_export.Parity, list]:
    onnx.save(model, path)
    rows: list = []
    return onnx_export.parity(path, tm, tm.input_names, _windows(), keep=rows), rows


def test_the_float_graph_keeps_every_token(llama_onnx, tmp_path):
    tm, _, proto, _ = llama_onnx
    par, rows = _rows(tm, proto, tmp_path / "f.onnx")
    assert len(rows) == 2 and rows[0][0]["input_ids"].shape == (1, 16) and rows[0][1][0].shape == rows[0][2][0].shape
    got = check_fidelity(CAUSAL, rows, "stages[3]")
    assert got["token_agreement"] == 1.0 and got["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert got["float_perplexity"] == pytest.approx(got["quantized_perplexity"], rel=1e-3)
    assert got["bounds"] == {"perplexity_ratio": "max 3", "token_agreement": "min 0.3"}
    assert par.max_rel_err < 1e-4


def test_int4_passes_where_logits_parity_would_not_matter_and_a_broken_graph_fails(llama_onnx, tmp_path):
    tm, _, proto, _ = llama_onnx
    _, rows = _rows(tm, _int4(proto), tmp_path / "q.onnx")
    ok = check_fidelity(CAUSAL, rows, "stages[3]")
    assert ok["perplexity_ratio"] < 1.5 and ok["token_agreement"] > 0.3
    _, broken_rows = _rows(tm, _int4(proto, 10.0), tmp_path / "b.onnx")
    with pytest.raises(StageFailed) as e:
        check_fidelity(CAUSAL, broken_rows, "stages[3]")
    assert e.value.field == "stages[3]" and e.value.exit_code == 1
    assert e.value.message.startswith("the quantized graph strays from the float model on the parity batches: ")
    assert "token_agreement" in e.value.message


def _gate(tm, model, tmp_path, rtol, quantized):
    staged = tmp_path / "staged.onnx"
    onnx.save(model, staged)
    graph = GateGraph("model", model, staged, staged, tm, _windows(), {"inputs": [], "outputs": []}, rtol, quantized)
    return gate([graph], {}, TensorRTSpec(target="x86-trt10"), tmp_path, field="stages[3]",
                rtol_field="stages[3].rtol", target_field="stages[3]", log=Events(None).log)[0]


def test_gate_uses_the_task_bounds_for_quantized_graphs_and_logits_parity_otherwise(llama_onnx, tmp_path):
    tm, _, proto, _ = llama_onnx
    broken = _int4(proto, 10.0)
    with pytest.raises(StageFailed) as e:  # quantized, no rtol: the task's bounds reject it
        _gate(tm, broken, tmp_path, None, quantized=True)
    assert e.value.field == "stages[3]" and "token_agreement 0 < 0.3" in e.value.message
    with pytest.raises(StageFailed) as e:  # a float export keeps the logits check
        _gate(tm, broken, tmp_path, 0.5, quantized=False)
    assert e.value.field == "stages[3].rtol" and "max relative error" in e.value.message
    report = _gate(tm, _int4(proto), tmp_path, None, quantized=True)
    assert report.fidelity is not None and report.fidelity["token_agreement"] > 0.3
    assert (tmp_path / "build" / "build_spec.json").is_file()
    assert _gate(tm, proto, tmp_path, 1e-3, quantized=False).fidelity is None
