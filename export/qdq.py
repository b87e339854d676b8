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
import onnx_ir as ir
from onnx import TensorProto

from . import inspect as onnx_inspect
from .graph import constant, constant_type, tidy

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


def _label(node: ir.Node) -> str:
    return node.name or node.outputs[0].name


def _zero_point(dq: ir.Node) -> ir.Value | None:
    return dq.inputs[2] if len(dq.inputs) > 2 else None


def output_channel_axis(node: ir.Node) -> int:
    """Axis of the weight (input 1) that indexes output channels: MatMul [K, N] -> 1, Gemm with
    transB=1 [N, K] -> 0, Conv [Cout, Cin, ...] -> 0, ConvTranspose [Cin, Cout, ...] -> 1."""
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 0 if node.op_type == "Conv" else 1


def _quantized_type(dq: ir.Node) -> int | None:
    """Element type of the integers a DequantizeLinear reads (initializer, or the Q's zero point / output_dtype)."""
    t = constant_type(dq.inputs[0])
    if t is not None:
        return t
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    if _zero_point(q) is not None:
        return constant_type(_zero_point(q))
    return q.attributes.get_int("output_dtype", 0) or TensorProto.UINT8  # the ONNX default without a zero point


def _describe_dq(dq: ir.Node) -> dict:
    scale = constant(dq.inputs[1])
    zp = constant(_zero_point(dq))
    block = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1)
    granularity = ("per-tensor" if scale is None or scale.size == 1 else
                   f"block {block} on axis {axis}" if block else f"per-channel axis {axis}")
    zp_max = int(np.abs(zp.astype(np.int64)).max()) if zp is not None and zp.size else 0
    return {"tensor": dq.inputs[0].name, "dtype": _TYPES.get(_quantized_type(dq), "unknown"),
            "granularity": granularity, "zero_point_max_abs": zp_max}


def _check_dq(dq: ir.Node) -> list[str]:
    """Problems of one DequantizeLinear on its own: what it reads and who reads it."""
    out = []
    name, x = _label(dq), dq.inputs[0].name
    is_weight = constant(dq.inputs[0]) is not None
    q = dq.inputs[0].producer()
    if not is_weight and (q is None or q.op_type != "QuantizeLinear"):
        out.append(f"{name}: dequantizes {x!r}, which is neither a weight nor a QuantizeLinear output")
    info = _describe_dq(dq)
    dtype = info["dtype"]
    if dtype == "int32":
        out.append(f"{name}: int32 tensor {x!r} dequantized (a quantized bias); keep biases in float")
    elif dtype.upper() not in SIGNED_TYPES:
        out.append(f"{name}: {dtype} quantization of {x!r} is unsigned or asymmetric; TensorRT takes signed "
                   "symmetric types (int8, int4 weights, fp8)")
    if info["zero_point_max_abs"]:
        out.append(f"{name}: non-zero zero point on {x!r} (asymmetric); TensorRT needs zero-point 0")
    scale = constant(dq.inputs[1])
    if not is_weight and scale is not None and scale.size > 1:
        out.append(f"{name}: per-channel scales on activation {x!r}; TensorRT wants per-tensor activation scales")
    if dtype == "int4" and not is_weight:
        out.append(f"{name}: int4 activation {x!r}; TensorRT runs int4 as weight-only")
    if dq.attributes.get_int("block_size", 0) and dtype != "int4":
        out.append(f"{name}: block quantization of {dtype} tensor {x!r}; blocks are for int4 weights")
    y = dq.outputs[0]
    if y.is_graph_output():
        out.append(f"{name}: a graph output is quantized ({y.name!r})")
    for node, idx in y.uses():
        where = f"{node.op_type} {_label(node)}"
        if node.op_type not in COMPUTE_OPS:
            out.append(f"{name}: quantized tensor {x!r} feeds {where}; Q/DQ belong on compute-op inputs only "
                       "(a quantized output or residual blocks TensorRT's fusion)")
        elif idx > 1:
            out.append(f"{name}: quantized bias {x!r} of {where}; keep biases in float")
    return out


def _check_q(q: ir.Node) -> list[str]:
    """A QuantizeLinear's integers go to a DequantizeLinear and nowhere else."""
    out = []
    y = q.outputs[0]
    for consumer, _ in y.uses():
        if consumer.op_type != "DequantizeLinear":
            out.append(f"{q.name}: quantized output {y.name!r} feeds {consumer.op_type} {consumer.name} directly "
                       "(integer op outside explicit Q/DQ)")
    if y.is_graph_output():
        out.append(f"{q.name}: a graph output is quantized ({y.name!r})")
    return out


def _check_weight_axis(node: ir.Node, dq: ir.Node) -> list[str]:
    scale = constant(dq.inputs[1])
    if scale is None or scale.size == 1:
        return []
    weight = constant(dq.inputs[0])
    rank = weight.ndim if weight is not None else 2
    axis = dq.attributes.get_int("axis", 1) % rank
    block = dq.attributes.get_int("block_size", 0)
    want = output_channel_axis(node)
    x = dq.inputs[0].name
    if block:
        k_axis = 1 - want if rank == 2 else None
        if axis != k_axis:
            return [f"{dq.name}: blocks of {x!r} run along axis {axis}, not along K (axis {k_axis}) of {node.name}"]
        return []
    if axis != want:
        return [(f"{dq.name}: per-channel axis {axis} of {x!r} is not the output-channel axis {want} of "
                 f"{node.op_type} {node.name}")]
    return []


def _weight_dqs(node: ir.Node) -> dict[int, ir.Node]:
    """The DequantizeLinear nodes feeding a compute op's activation (0) and weight (1)."""
    producers = {i: v.producer() for i, v in enumerate(node.inputs[:2]) if v is not None}
    return {i: p for i, p in producers.items() if p is not None and p.op_type == "DequantizeLinear"}


def inspect_qdq(model: onnx.ModelProto) -> QdqReport:
    """Every quantized compute op with its input schemes, and every layout TensorRT would not fuse."""
    graph = ir.from_proto(model).graph
    report = QdqReport()
    for node in graph:
        if node.op_type == "DequantizeLinear":
            report.problems += _check_dq(node)
            report.dtypes[_label(node)] = _describe_dq(node)["dtype"]
        elif node.op_type == "QuantizeLinear":
            report.problems += _check_q(node)
    for node in graph:
        if node.op_type not in COMPUTE_OPS:
            continue
        dqs = _weight_dqs(node)
        if not dqs:
            continue
        inputs = {i: _describe_dq(d) for i, d in dqs.items()}
        if 1 in dqs:
            report.problems += _check_weight_axis(node, dqs[1])
        if 0 in dqs and 1 in dqs:
            scheme = f"w{inputs[1]['dtype'].removeprefix('int')}a{inputs[0]['dtype'].removeprefix('int')}"
        elif 1 in dqs:
            scheme = f"w{inputs[1]['dtype'].removeprefix('int')} weight-only"
        else:
            scheme = "activation-only"
            report.problems.append(f"{node.op_type} {node.name}: activation quantized but weight "
                                   f"{node.inputs[1].name!r} is float; TensorRT cannot run it in int8")
        report.nodes.append({"node": node.name, "op": node.op_type, "module": onnx_inspect.torch_scope(node) or "",
                             "scheme": scheme, "inputs": {("activation" if i == 0 else "weight"): v
                                                          for i, v in inputs.items()}})
    return report


def restrict_to_compute_inputs(model: ir.Model) -> int:
    """Give every non-compute reader of a quantized activation the float tensor back.

    ONNX Runtime's QDQ quantizer rewires *all* readers of a tensor it quantizes for a MatMul, so a
    LayerNorm output that also feeds the residual Add makes the residual stream int8. TensorRT
    would not fuse that, and it costs accuracy (ModelOpt strips such Q/DQ too). Returns the number
    of rewired inputs; Q/DQ nodes and initializers left without readers are removed.
    """
    rewired = 0
    for node in model.graph:
        if node.op_type in COMPUTE_OPS or node.op_type in QDQ_OPS:
            continue
        for i, value in enumerate(node.inputs):
            dq = value.producer() if value is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = dq.inputs[0].producer()
            if q is not None and q.op_type == "QuantizeLinear":
                node.replace_input_with(i, q.inputs[0])
                rewired += 1
    tidy(model)
    return rewired
