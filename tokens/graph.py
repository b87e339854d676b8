"""Checks on an exported graph with a token selector, and the graphs exported next to it.

TensorRT 10.3 (JetPack 6) parses TopK only with a constant K below 3840 and Reduce* only with
constant axes; the selection must not fall back to data-dependent shapes (NonZero/GatherND from
boolean indexing, Unique) or to scatters, which TensorRT either refuses or gets wrong with reductions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from export import onnx as onnx_export
from pipeline.errors import StageFailed

# ONNX ops a ViT/CLIP encoder with a selector exports to, each listed as supported by onnx-tensorrt's
# docs/operators.md (8.5 onward; LayerNormalization from 8.6). Anything else fails the check.
TENSORRT_OPS = frozenset({
    "Add", "ArgMax", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal", "Erf", "Exp",
    "Expand", "Flatten", "Gather", "GatherElements", "Gemm", "Greater", "Identity", "IsNaN", "LayerNormalization",
    "Less", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Pow", "Range", "Reciprocal", "ReduceL2", "ReduceMax",
    "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze",
    "Sub", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where"})
# Ops a selector must never produce, and why.
AVOIDED = {"NonZero": "data-dependent shape (boolean indexing)", "Unique": "not parsed by TensorRT",
           "GatherND": "boolean-mask indexing", "ScatterND": "scatter without reduction support",
           "ScatterElements": "scatter reductions fail on TensorRT"}
TOPK_MAX = 3840


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return consts | {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                     if n.op_type == "Constant" and n.attribute[0].name == "value"}


def trt_problems(model: onnx.ModelProto) -> list[str]:
    """Why the graph would not parse as a static-K graph on TensorRT 10.3 (empty when it would; checked
        against the importer's documented constraints, not by a TensorRT build)."""
    consts = _constants(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in TENSORRT_OPS:
            why = AVOIDED.get(node.op_type, "not in the TensorRT operator list")
            problems.append(f"{node.op_type} ({why}) at {node.name}")
        elif node.op_type == "TopK":
            k = consts.get(node.input[1])
            if k is None:
                problems.append(f"TopK {node.name}: K is computed in the graph, not a constant")
            elif int(k.reshape(-1)[0]) >= TOPK_MAX:
                problems.append(f"TopK {node.name}: K={int(k.reshape(-1)[0])} >= {TOPK_MAX}")
            if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
                problems.append(f"TopK {node.name}: sorted=0")
        elif node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1] \
                and node.input[1] not in consts:
            problems.append(f"{node.op_type} {node.name}: axes are not a constant")
    return problems


def topk_constants(model: onnx.ModelProto) -> list[int]:
    """The K of every TopK node, in graph order (each must be a constant)."""
    consts = _constants(model)
    return [int(consts[n.input[1]].reshape(-1)[0]) for n in model.graph.node if n.op_type == "TopK"]


def check_export(tokens, model: onnx.ModelProto, path: Path, module, inputs: list[tuple], opset: int,
                 rtol: float) -> dict:
    """Run after model.onnx is written: TensorRT constraints, exact index parity, companion graphs."""
    problems = trt_problems(model)
    if problems:
        raise StageFailed(f"token selection is not TensorRT-ready: {'; '.join(problems[:3])}", field="export")
    report = {"topk_k": sorted(set(topk_constants(model))), "tensorrt_checks": "ok", **tokens.describe()}
    if tokens.placement.output:
        report["index_parity"] = _index_parity(path, module, inputs)
    report["companions"] = [_export_companion(path.parent, c, opset, rtol) for c in tokens.companions]
    return report


def _index_parity(path: Path, module, inputs: list[tuple]) -> str:
    """Selected indices must be identical in ONNX Runtime and PyTorch (a tolerance would hide a swap)."""
    import torch

    sess = onnx_export.session(path)
    for batch in inputs:
        with torch.no_grad():
            want = module(*batch)[1].numpy()
        got = sess.run(["token_index"], {n: t.numpy() for n, t in zip(module.input_names, batch)})[0]
        if not np.array_equal(want, got):
            raise StageFailed(f"ONNX Runtime selected other tokens than PyTorch ({int((want != got).sum())} of "
                              f"{want.size} indices differ)", field="export")
    return "identical"


def _export_companion(folder: Path, companion, opset: int, rtol: float) -> dict:
    path = folder / companion.file
    proto = onnx_export.export(companion.module, companion.example, path, companion.module.input_names,
                               companion.module.output_names, opset)
    par = onnx_export.parity(path, companion.module, companion.module.input_names, [companion.example])
    if par.max_rel_err > rtol:
        raise StageFailed(f"{companion.file}: ONNX Runtime differs from PyTorch: max relative error "
                          f"{par.max_rel_err:.3g} > export.rtol {rtol:g}", field="export")
    return {"path": companion.file, **onnx_export.io_spec(proto), "parity": par.as_dict()}
