"""Reading an exported graph back: which initializer is which torch weight, sparsity, FLOPs.

Pruning masks must survive export, and 2:4 groups must run along the *input* (K) dimension of
the initializer TensorRT sees: a MatMul's B is [K, N], a Gemm's B with transB=1 is [N, K].
The dynamo exporter records each node's torch module path in ``pkg.torch.onnx.name_scopes``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import shape_inference

from .graph import constant

SCOPES = "pkg.torch.onnx.name_scopes"


def scope(node: ir.Node) -> str | None:
    """The torch module that emitted ``node``: the deepest scope of the module chain (the last
    entry of ``name_scopes`` is the aten op itself, e.g. "linear")."""
    scopes = node.metadata_props.get(SCOPES)
    if scopes is None:
        return None
    chain = None
    for s in ast.literal_eval(scopes)[1:]:
        if chain is None or s.startswith(chain + "."):
            chain = s
    return chain


def _weight(node: ir.Node) -> np.ndarray | None:
    """A MatMul/Gemm weight as stored: an initializer, or a DequantizeLinear of one (dequantized
    here, so zeros read as zeros and values as the graph computes them)."""
    b = node.inputs[1]
    if b is None:
        return None
    if b.const_value is not None:
        return _array(b.const_value)
    dq = b.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
        return None
    q = _array(dq.inputs[0].const_value).astype(np.float32)
    scale = constant(dq.inputs[1]).astype(np.float32)
    zp = constant(dq.inputs[2]).astype(np.float32) if len(dq.inputs) > 2 and dq.inputs[2] is not None else 0.0
    axis, block = dq.attributes.get_int("axis", 1) % q.ndim, dq.attributes.get_int("block_size", 0)
    if scale.size > 1:
        if block:  # blocked: scale has ceil(dim / block) entries along axis
            scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
            zp = np.repeat(zp, block, axis=axis).take(range(q.shape[axis]), axis=axis) if np.ndim(zp) else zp
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zp = zp.reshape(shape) if np.ndim(zp) else zp
    return (q - zp) * scale


def _array(tensor) -> np.ndarray:
    """A constant's values; an external one's copied out and its file mapping closed, so that reading a
    large graph's weights one after another never keeps them all mapped."""
    if isinstance(tensor, ir.ExternalTensor):
        array = np.array(tensor.numpy())
        tensor.release()
        return array
    return tensor.numpy()


def matmul_weights(model: onnx.ModelProto, base_dir: Path | None = None) -> Iterator[tuple[ir.Node, np.ndarray]]:
    """Every MatMul/Gemm whose B is a constant 2-D weight (maybe behind a DequantizeLinear), with
    that weight as [K, N] (input dimension first), dequantized; one at a time. ``base_dir``: the
    graph's folder, where its external data lies."""
    graph = ir.from_proto(model).graph
    if base_dir is not None:
        ir.external_data.set_base_dir(graph, base_dir)
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        w = _weight(node)
        if w is None or w.ndim != 2:
            continue
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1:
            w = w.T
        yield node, w


def torch_scope(node: ir.Node, strip_prefix: str = "model.") -> str | None:
    """The torch module name of ``node`` as the model's ``named_modules`` spells it."""
    name = scope(node)
    return name.removeprefix(strip_prefix) if name else None


def linear_nodes(model: onnx.ModelProto, strip_prefix: str = "model.") -> dict[str, ir.Node]:
    """torch Linear name -> the MatMul/Gemm node that computes it (its weight a constant, maybe quantized)."""
    return {s: node for node, _ in matmul_weights(model) if (s := torch_scope(node, strip_prefix))}


def linear_weights(model: onnx.ModelProto, strip_prefix: str = "model.") -> dict[str, np.ndarray]:
    """torch Linear name -> its exported weight as [K, N] (input dimension first), dequantized."""
    return {s: w for node, w in matmul_weights(model) if (s := torch_scope(node, strip_prefix))}


def nm_violations(weight_kn: np.ndarray, n: int, m: int) -> int:
    """Number of (column, group of M along K) with more than N non-zeros."""
    k, cols = weight_kn.shape
    groups = (weight_kn[: k - k % m] != 0).reshape(k // m, m, cols).sum(1)
    return int((groups > n).sum())


def matmul_flops(model: onnx.ModelProto) -> int:
    """2*M*K*N summed over MatMul/Gemm (and Conv) nodes, from inferred static shapes."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for i in inferred.graph.initializer:
        shapes[i.name] = list(i.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not a or not b:
                continue
            if node.op_type == "Gemm":
                ta = any(x.name == "transA" and x.i for x in node.attribute)
                tb = any(x.name == "transB" and x.i for x in node.attribute)
                m, k = (a[1], a[0]) if ta else (a[0], a[1])
                nn = b[0] if tb else b[1]
                total += 2 * m * k * nn
            else:
                batch = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))) if len(a) > 2 or len(b) > 2 else 1
                total += 2 * batch * a[-2] * a[-1] * b[-1]
        elif node.op_type == "Conv":
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and y:
                total += 2 * int(np.prod(y)) * int(np.prod(w[1:]))
    return int(total)
