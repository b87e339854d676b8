"""Where Q/DQ nodes sit in a graph, and whether TensorRT's explicit quantization would fuse them.

TensorRT fuses a DequantizeLinear into the compute op it feeds (MatMul/Gemm/Conv) and runs that op
in INT8 only when the layout is the one its documentation describes (docs/methods/quantization.md §3.1-§3.2): symmetric
INT8 (zero-point 0, signed), activations per tensor, weights per channel on the output-channel axis,
Q/DQ on the *inputs* of compute ops only, biases in float. INT4 appears only as block-quantized
weights (weight-only, blocks along K). Everything else is a layout this module reports as a problem:
a quantized tensor feeding a non-compute op (a quantized output or residual), unsigned or
asymmetric quantization, an int32/int8 bias, a per-channel axis that is not the output channel, an
activation quantized while the weight stays float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import inspect as onnx_inspect

COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_TYPES = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT4: "int4", TensorProto.UINT4: "uint4",
          TensorProto.INT16: "int16", TensorProto.UINT16: "uint16", TensorProto.INT32: "int32",
          TensorProto.FLOAT8E4M3FN: "float8e4m3fn", TensorProto.FLOAT8E5M2: "float8e5m2",
          TensorProto.FLOAT4E2M1: "float4e2m1"}
# Signed symmetric types TensorRT can run (which of them a target takes is export.tensorrt's business).
SIGNED_TYPES = frozenset({"INT8", "INT4", "FLOAT8E4M3FN", "FLOAT8E5M2", "FLOAT4E2M1"})


@dataclass
class QdqReport:
    """``nodes``: one entry per compute op with a quantized input; ``problems``: one line each;
    ``dtypes``: the element type each DequantizeLinear reads."""

    nodes: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def schemes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n["scheme"]] = out.get(n["scheme"], 0) + 1
        return out

    def as_dict(self, limit: int = 20) -> dict:
        return {"quantized_ops": len(self.nodes), "schemes": self.schemes, "ok": not self.problems,
                "problems": self.problems[:limit]}


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    def elem_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            return p.attribute[0].t.data_type
        return None


def output_channel_axis(node: onnx.NodeProto) -> int:
    """Axis of the weight (input 1) that indexes output channels: MatMul [K, N] -> 1, Gemm with
    transB=1 [N, K] -> 0, Conv [Cout, Cin, ...] -> 0, ConvTranspose [Cin, Cout, ...] -> 1."""
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        return 0 if onnx_inspect.attr(node, "transB", 0) else 1
    return 0 if node.op_type == "Conv" else 1


def _quantized_type(g: _Graph, dq: onnx.NodeProto) -> int | None:
    """Element type of the integers a DequantizeLinear reads (initializer, or the Q's zero point / output_dtype)."""
    t = g.elem_type(dq.input[0])
    if t is not None:
        return t
    q = g.producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    if len(q.input) > 2 and q.input[2]:
        return g.elem_type(q.input[2])
    return onnx_inspect.attr(q, "output_dtype", 0) or TensorProto.UINT8  # the ONNX default without a zero point


def _describe_dq(g: _Graph, dq: onnx.NodeProto) -> dict:
    scale = g.const(dq.input[1])
    zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    block = onnx_inspect.attr(dq, "block_size", 0) or 0
    granularity = ("per-tensor" if scale is None or scale.size == 1 else
                   f"block {block} on axis {onnx_inspect.attr(dq, 'axis', 1)}" if block else f"per-channel axis {onnx_inspect.attr(dq, 'axis', 1)}")
    return {"tensor": dq.input[0], "dtype": _TYPES.get(_quantized_type(g, dq), "unknown"),
            "granularity": granularity, "zero_point_max_abs": int(np.abs(zp.astype(np.int64)).max()) if zp is not None and zp.size else 0}


def _check_dq(g: _Graph, dq: onnx.NodeProto) -> list[str]:
    """Problems of one DequantizeLinear on its own: what it reads and who reads it."""
    out = []
    name, x = dq.name or dq.output[0], dq.input[0]
    is_weight = g.const(x) is not None
    q = g.producer.get(x)
    if not is_weight and (q is None or q.op_type != "QuantizeLinear"):
        out.append(f"{name}: dequantizes {x!r}, which is neither a weight nor a QuantizeLinear output")
    info = _describe_dq(g, dq)
    dtype = info["dtype"]
    if dtype == "int32":
        out.append(f"{name}: int32 tensor {x!r} dequantized (a quantized bias); keep biases in float")
    elif dtype.upper() not in SIGNED_TYPES:
        out.append(f"{name}: {dtype} quantization of {x!r} is unsigned or asymmetric; TensorRT takes signed "
                   "symmetric types (int8, int4 weights, fp8)")
    if info["zero_point_max_abs"]:
        out.append(f"{name}: non-zero zero point on {x!r} (asymmetric); TensorRT needs zero-point 0")
    scale = g.const(dq.input[1])
    if not is_weight and scale is not None and scale.size > 1:
        out.append(f"{name}: per-channel scales on activation {x!r}; TensorRT wants per-tensor activation scales")
    if dtype == "int4" and not is_weight:
        out.append(f"{name}: int4 activation {x!r}; TensorRT runs int4 as weight-only")
    if (onnx_inspect.attr(dq, "block_size", 0) or 0) and dtype != "int4":
        out.append(f"{name}: block quantization of {dtype} tensor {x!r}; blocks are for int4 weights")
    if dq.output[0] in g.outputs:
        out.append(f"{name}: a graph output is quantized ({dq.output[0]!r})")
    for node, idx in g.consumers.get(dq.output[0], []):
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.op_type not in COMPUTE_OPS:
            out.append(f"{name}: quantized tensor {x!r} feeds {where}; Q/DQ belong on compute-op inputs only "
                       "(a quantized output or residual blocks TensorRT's fusion)")
        elif idx > 1:
            out.append(f"{name}: quantized bias {x!r} of {where}; keep biases in float")
    return out


def _check_weight_axis(g: _Graph, node: onnx.NodeProto, dq: onnx.NodeProto) -> list[str]:
    scale = g.const(dq.input[1])
    if scale is None or scale.size == 1:
        return []
    weight = g.const(dq.input[0])
    rank = weight.ndim if weight is not None else 2
    axis = onnx_inspect.attr(dq, "axis", 1) % rank
    block = onnx_inspect.attr(dq, "block_size", 0) or 0
    want = output_channel_axis(node)
    if block:
        k_axis = 1 - want if rank == 2 else None
        if axis != k_axis:
            return [f"{dq.name}: blocks of {dq.input[0]!r} run along axis {axis}, not along K (axis {k_axis}) of {node.name}"]
        return []
    if axis != want:
        return [f"{dq.name}: per-channel axis {axis} of {dq.input[0]!r} is not the output-channel axis {want} of "
                f"{node.op_type} {node.name}"]
    return []


def inspect_qdq(model: onnx.ModelProto) -> QdqReport:
    """Every quantized compute op with its input schemes, and every layout TensorRT would not fuse."""
    g = _Graph(model)
    report = QdqReport()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            report.problems += _check_dq(g, node)
            report.dtypes[node.name or node.output[0]] = _describe_dq(g, node)["dtype"]
        elif node.op_type == "QuantizeLinear":
            for consumer, _ in g.consumers.get(node.output[0], []):
                if consumer.op_type != "DequantizeLinear":
                    report.problems.append(f"{node.name}: quantized output {node.output[0]!r} feeds {consumer.op_type} "
                                           f"{consumer.name} directly (integer op outside explicit Q/DQ)")
            if node.output[0] in g.outputs:
                report.problems.append(f"{node.name}: a graph output is quantized ({node.output[0]!r})")
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        dqs = {i: g.producer.get(x) for i, x in enumerate(node.input[:2])}
        dqs = {i: d for i, d in dqs.items() if d is not None and d.op_type == "DequantizeLinear"}
        if not dqs:
            continue
        inputs = {i: _describe_dq(g, d) for i, d in dqs.items()}
        if 1 in dqs:
            report.problems += _check_weight_axis(g, node, dqs[1])
        if 0 in dqs and 1 in dqs:
            scheme = f"w{inputs[1]['dtype'].removeprefix('int')}a{inputs[0]['dtype'].removeprefix('int')}"
        elif 1 in dqs:
            scheme = f"w{inputs[1]['dtype'].removeprefix('int')} weight-only"
        else:
            scheme = "activation-only"
            report.problems.append(f"{node.op_type} {node.name}: activation quantized but weight {node.input[1]!r} "
                                   "is float; TensorRT cannot run it in int8")
        report.nodes.append({"node": node.name, "op": node.op_type, "module": onnx_inspect.torch_scope(node) or "",
                             "scheme": scheme, "inputs": {("activation" if i == 0 else "weight"): v
                                                          for i, v in inputs.items()}})
    return report


def restrict_to_compute_inputs(model: onnx.ModelProto) -> int:
    """Give every non-compute reader of a quantized activation the float tensor back.

    ONNX Runtime's QDQ quantizer rewires *all* readers of a tensor it quantizes for a MatMul, so a
    LayerNorm output that also feeds the residual Add makes the residual stream int8. TensorRT
    would not fuse that, and it costs accuracy (ModelOpt strips such Q/DQ too). Returns the number
    of rewired inputs; Q/DQ nodes left without readers are removed.
    """
    g = _Graph(model)
    rewired = 0
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS or node.op_type in QDQ_OPS:
            continue
        for i, name in enumerate(node.input):
            dq = g.producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = g.producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    remove_dead(model)
    return rewired


def remove_dead(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
