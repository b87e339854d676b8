"""TensorRT readiness: can a target's ONNX parser import this graph, and build it as intended?

Runs anywhere (no TensorRT, no GPU): every check is a function over an ``onnx.ModelProto``.
``check(model, target)`` collects them into a ``Readiness`` whose errors fail the export, each
naming the node and the reason. The checks:

- static shapes: every dimension of every tensor is a fixed number after shape inference (the
  engine is specialised to the shapes; no optimisation profile);
- operators: opset within the parser's range, every operator in its support table, inputs the
  parser needs as build-time constants, and attribute limits (``export.trt_targets``);
- Q/DQ (``qdq_findings``, reusable by the quantization stage): the explicit-quantization layouts
  TensorRT fuses — signed symmetric (zero point 0), per-tensor activations, per-channel weights
  on the output-channel axis, float biases, no quantized graph outputs;
- weights: bytes per element type and the largest tensor;
- 2:4 sparsity per MatMul/Gemm weight (what ``--sparsity=enable`` can use).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from . import inspect as onnx_inspect
from . import qdq
from .trt_targets import TARGETS, TOPK_MAX_K, Target

_DEFAULT_DOMAINS = ("", "ai.onnx")
_INFER_KEEP_BYTES = 1 << 16  # initializers above this lose their data in the shape-inference copy


@dataclass
class Finding:
    check: str
    node: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.message}" if self.node else self.message


@dataclass
class Readiness:
    target: Target
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    weights: dict = field(default_factory=dict)
    sparsity: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def sparse_layers(self) -> int:
        return sum(1 for s in self.sparsity if s["2:4"])

    def summary(self, limit: int = 5) -> str:
        shown = "; ".join(str(f) for f in self.errors[:limit])
        more = f" (and {len(self.errors) - limit} more in manifest.json)" if len(self.errors) > limit else ""
        return f"{shown}{more}"

    def as_dict(self) -> dict:
        t = self.target
        checks = ("static-shapes", "opset", "operators", "qdq", "weights")
        return {"target": t.name, "tensorrt": t.tensorrt, "platform": t.platform,
                "compute_capability": t.compute_capability, "operator_table": t.operator_table,
                "ok": self.ok,
                "checks": {c: "fail" if any(f.check == c for f in self.errors) else "pass" for c in checks},
                "errors": [f.__dict__ for f in self.errors], "warnings": [f.__dict__ for f in self.warnings],
                "weights": self.weights, "sparse_2_4_layers": self.sparse_layers,
                "sparsity": self.sparsity}


def check(model: onnx.ModelProto, target: str | Target) -> Readiness:
    t = TARGETS[target] if isinstance(target, str) else target
    graph = _Graph(model)
    r = Readiness(t)
    for finding in (*static_shape_findings(graph.inferred), *operator_findings(model, t, graph),
                    *qdq_findings(model, t.quantized_types), *type_findings(graph, t)):
        (r.warnings if finding.check == "warning" else r.errors).append(finding)
    r.weights = weight_summary(model)
    if r.weights["bytes_by_type"].get("FLOAT"):
        r.warnings.append(Finding("warning", None, "float32 weights: a strongly typed build keeps them FP32 (TF32 "
                                                   "math); a quantize stage emits FP16/INT8 in the ONNX"))
    r.sparsity = sparsity_layers(model)
    return r


class _Graph:
    """Lookups the checks share: producers, consumers, constants, inferred types and shapes."""

    def __init__(self, model: onnx.ModelProto):
        self.inferred = _infer(model)
        g = model.graph
        self.nodes = list(_all_nodes(g))
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {i.name: i for i in g.initializer}
        constant_nodes = {n.output[0]: n for n in self.nodes if n.op_type == "Constant"}
        self.constants = set(self.initializers) | set(constant_nodes)
        self._constant_nodes = constant_nodes
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in [*self.inferred.graph.input, *self.inferred.graph.output,
                                *self.inferred.graph.value_info]}
        self.types.update({i.name: i.data_type for i in g.initializer})
        self.types.update({name: n.attribute[0].t.data_type for name, n in constant_nodes.items()
                           if n.attribute and n.attribute[0].name == "value"})

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant input, or None when it is computed at run time."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self._constant_nodes.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def type_name(self, name: str) -> str | None:
        t = self.types.get(name)
        return onnx.TensorProto.DataType.Name(t) if t else None


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_nodes(sub)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on a copy without large weight data: shapes only need the initializers'
    dims, and the copy stays under protobuf's 2 GB limit whatever the model's size."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.raw_data) > _INFER_KEEP_BYTES:
            dims, dtype, name = list(init.dims), init.data_type, init.name
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
    # Shape inference reads dims only from the value_info of a cleared initializer.
    return shape_inference.infer_shapes(light, data_prop=True)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def static_shape_findings(inferred: onnx.ModelProto) -> list[Finding]:
    """Every dimension fixed: graph inputs/outputs and every intermediate tensor after inference."""
    g = inferred.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out, seen = [], set()
    for kind, values in (("input", g.input), ("output", g.output), ("tensor", g.value_info)):
        for v in values:
            if v.name in seen or not v.type.HasField("tensor_type"):
                continue
            seen.add(v.name)
            t = v.type.tensor_type
            if not t.HasField("shape"):
                continue
            for i, d in enumerate(t.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    continue
                what = f"dimension {i} of {kind} '{v.name}' is {d.dim_param or 'unknown'} (dynamic)"
                if v.name in producer:
                    where = _label(producer[v.name])
                else:
                    where = ", ".join(_label(n) for n in consumers.get(v.name, [])[:2]) or f"{kind} '{v.name}'"
                out.append(Finding("static-shapes", where, what + "; export with fixed shapes"))
                break
    return out


def operator_findings(model: onnx.ModelProto, t: Target, graph: _Graph | None = None) -> list[Finding]:
    graph = graph or _Graph(model)
    out = []
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS and o.version > t.max_opset:
            out.append(Finding("opset", None, f"opset {o.version} is above TensorRT {t.tensorrt}'s ONNX parser "
                                              f"maximum {t.max_opset}; export with export.opset <= {t.max_opset}"))
    constant_inputs: dict[str, list[tuple[int, str]]] = {}
    for op, idx, name in t.constant_inputs:
        constant_inputs.setdefault(op, []).append((idx, name))
    for node in graph.nodes:
        where = _label(node)
        if node.domain not in _DEFAULT_DOMAINS:
            out.append(Finding("operators", where, f"custom-domain operator '{node.domain}::{node.op_type}' needs a "
                                                   "TensorRT plugin"))
            continue
        if node.op_type not in t.operators:
            out.append(Finding("operators", where, f"{node.op_type} is not supported by TensorRT {t.tensorrt}'s "
                                                   "ONNX parser"))
            continue
        for idx, name in constant_inputs.get(node.op_type, []):
            if len(node.input) > idx and node.input[idx] and node.input[idx] not in graph.constants:
                out.append(Finding("operators", where, f"input '{name}' must be a build-time constant "
                                                       "(initializer or Constant) for TensorRT"))
        out += [Finding("operators", where, m) for m in _attribute_limits(node, graph, t)]
    return out


def _attribute_limits(node: onnx.NodeProto, graph: _Graph, t: Target) -> list[str]:
    """Per-operator restrictions from the support tables that a static check can see."""
    op = node.op_type
    if op == "TopK":
        out = [] if onnx_inspect.attr(node, "sorted", 1) == 1 else ["TopK 'sorted' must be 1"]
        k = graph.value(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
            out.append(f"TopK K={int(np.asarray(k).reshape(-1)[0])} must be less than {TOPK_MAX_K}")
        return out
    if op == "LayerNormalization" and any(node.output[1:]):
        return ["only LayerNormalization's first output Y is supported"]
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return ["MaxPool 'Indices' output is unsupported"]
    if op in ("MaxPool", "AveragePool", "LpPool") and any(d != 1 for d in onnx_inspect.attr(node, "dilations", []) or []):
        return [f"{op} 'dilations' must be empty or all ones"]
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        training = graph.value(node.input[2])
        if training is None or bool(np.asarray(training).reshape(-1)[0]):
            return ["Dropout 'training_mode' must be a constant False"]
    if op == "ScatterND" and onnx_inspect.attr(node, "reduction", b"none") != b"none":
        return ["ScatterND 'reduction' other than none is unsupported"]
    if op == "Einsum" and t.major_minor < (10, 12) and b"..." in onnx_inspect.attr(node, "equation", b""):
        return ["Einsum ellipsis is unsupported before TensorRT 10.12"]
    if op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        return ["Constant 'sparse_value' and string values are unsupported"]
    if op == "Resize":
        out = []
        if onnx_inspect.attr(node, "mode", b"nearest").decode() not in ("nearest", "linear"):
            out.append("Resize mode must be nearest or linear")
        ctm = onnx_inspect.attr(node, "coordinate_transformation_mode", b"half_pixel").decode()
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            out.append(f"Resize coordinate_transformation_mode '{ctm}' is unsupported")
        if onnx_inspect.attr(node, "antialias", 0):
            out.append("Resize antialiasing is unsupported")
        return out
    if op == "LSTM" and (onnx_inspect.attr(node, "input_forget", 0) or onnx_inspect.attr(node, "layout", 0)):
        return ["LSTM 'input_forget' and 'layout' must be 0"]
    return []


def type_findings(graph: _Graph, t: Target) -> list[Finding]:
    """Element types the target's parser cannot take (errors) or narrows (warnings)."""
    out = []
    narrowed = {"DOUBLE": "cast down to FLOAT"}
    refused = set()
    if t.major_minor < (9, 0):  # 8.5: no BF16; INT64 is cast to INT32 (9.0 EA added INT64)
        narrowed["INT64"] = "cast down to INT32, clamping to +-INT_MAX"
        refused.add("BFLOAT16")
    seen = set()
    for node in graph.nodes:
        for name in node.output:
            kind = graph.type_name(name)
            if kind in refused:
                out.append(Finding("weights", _label(node), f"{kind} tensors are unsupported by TensorRT {t.tensorrt}"))
            elif kind in narrowed and kind not in seen:
                seen.add(kind)
                out.append(Finding("warning", _label(node), f"{kind} tensors are {narrowed[kind]} by TensorRT "
                                                           f"{t.tensorrt} (first at this node)"))
    return out


# -- explicit quantization ----------------------------------------------------------------------

def qdq_findings(model: onnx.ModelProto, quantized_types: frozenset[str] | set[str] = frozenset({"INT8"})) \
        -> list[Finding]:
    """The explicit-quantization layouts TensorRT fuses (``export.qdq``, docs/methods/quantization.md §3.1-§3.2), plus
    the quantized element types this target's parser takes."""
    report = qdq.inspect_qdq(model)
    out = [Finding("qdq", None, p) for p in report.problems]
    for dq, dtype in report.dtypes.items():
        if dtype.upper() in qdq.SIGNED_TYPES and dtype.upper() not in quantized_types:
            out.append(Finding("qdq", f"DequantizeLinear '{dq}'", f"{dtype.upper()} quantization is unsupported "
                                                                  f"by this target (supported: "
                                                                  f"{', '.join(sorted(quantized_types))})"))
    return out


# -- weights and sparsity -----------------------------------------------------------------------

def weight_summary(model: onnx.ModelProto) -> dict:
    by_type: dict[str, int] = {}
    largest = ("", 0)
    for init in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(init.data_type)
        nbytes = int(np.prod(init.dims, dtype=np.int64) * _itemsize(init.data_type))
        by_type[kind] = by_type.get(kind, 0) + nbytes
        if nbytes > largest[1]:
            largest = (init.name, nbytes)
    return {"bytes": sum(by_type.values()), "bytes_by_type": by_type,
            "largest": {"name": largest[0], "bytes": largest[1]}, "initializers": len(model.graph.initializer)}


def _itemsize(data_type: int) -> float:
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return 0.5
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def sparsity_layers(model: onnx.ModelProto) -> list[dict]:
    """Per MatMul/Gemm weight: zeros and whether every group of 4 along K has at most 2 non-zeros
    (the 2:4 layout sparse tensor cores run; TensorRT picks sparse tactics per layer)."""
    out = []
    for node, w in onnx_inspect.matmul_weights(model):
        k = w.shape[0]
        dense = k % 4 != 0 or onnx_inspect.nm_violations(w, 2, 4) > 0
        out.append({"node": node.name or node.output[0], "module": onnx_inspect.torch_scope(node),
                    "shape_kn": list(w.shape), "zeros": round(float((w == 0).mean()), 4), "2:4": not dense})
    return out
