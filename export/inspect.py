"""Reading an exported graph back: which initializer is which torch weight, sparsity, FLOPs.

Pruning masks must survive export, and 2:4 groups must run along the *input* (K) dimension of
the initializer TensorRT sees: a MatMul's B is [K, N], a Gemm's B with transB=1 is [N, K].
The dynamo exporter records each node's torch module path in ``pkg.torch.onnx.name_scopes``.
"""

from __future__ import annotations

import ast

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference


def _scope(node: onnx.NodeProto) -> str | None:
    """The torch module that emitted ``node``: the deepest scope of the module chain (the last
    entry of ``name_scopes`` is the aten op itself, e.g. "linear")."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            chain = None
            for scope in ast.literal_eval(p.value)[1:]:
                if chain is None or scope.startswith(chain + "."):
                    chain = scope
            return chain
    return None


def matmul_weights(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """Every MatMul/Gemm whose B is a constant weight, with that weight as [K, N] (input dimension
    first). A weight behind a DequantizeLinear (Q/DQ graphs) is read as its stored integers."""
    inits = {i.name: i for i in model.graph.initializer}
    dequantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1] if node.input[1] in inits else dequantized.get(node.input[1])
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.ndim != 2:
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute):
            w = w.T
        out.append((node, w))
    return out


def torch_scope(node: onnx.NodeProto, strip_prefix: str = "model.") -> str | None:
    """The torch module name of ``node`` as the model's ``named_modules`` spells it."""
    scope = _scope(node)
    return scope.removeprefix(strip_prefix) if scope else None


def linear_weights(model: onnx.ModelProto, strip_prefix: str = "model.") -> dict[str, np.ndarray]:
    """torch Linear name -> its exported weight as [K, N] (input dimension first)."""
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
