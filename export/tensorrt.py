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
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import shape_inference

from . import inspect as onnx_inspect
from . import qdq
from .graph import constant, constant_type
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


REDUCED_PRECISION = {"FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT4", "UINT4", "FLOAT8E4M3FN"}


def check(model: onnx.ModelProto, target: str | Target, base_dir: Path | None = None) -> Readiness:
    """Every readiness check on ``model``; ``base_dir`` is its folder when its weights are external data."""
    t = TARGETS[target] if isinstance(target, str) else target
    graph = _Graph(model)
    r = Readiness(t)
    for finding in (*static_shape_findings(graph.ir), *operator_findings(model, t, graph),
                    *qdq_findings(model, t.quantized_types), *type_findings(graph, t)):
        (r.warnings if finding.check == "warning" else r.errors).append(finding)
    r.weights = weight_summary(model)
    stored = r.weights["bytes_by_type"]
    # Only an unquantized graph: after a quantize stage the float32 left (embeddings, layers it was told to
    # keep) is what the recipe chose, and the warning's advice would be wrong.
    if stored.get("FLOAT") and not set(stored) & REDUCED_PRECISION:
        r.warnings.append(Finding("warning", None, "float32 weights: a strongly typed build keeps them FP32 (TF32 "
                                                   "math); a quantize stage emits FP16/INT8 in the ONNX"))
    r.sparsity = sparsity_layers(model, base_dir)
    return r


class _Graph:
    """The shape-inferred graph in onnx_ir, which the checks share: its values know their producer,
    uses, element type and (for initializers and Constant outputs) their value; ``nodes`` includes
    the nodes of subgraphs (If/Loop/Scan bodies)."""

    def __init__(self, model: onnx.ModelProto):
        self.ir = ir.from_proto(_infer(model))
        self.nodes = list(ir.traversal.RecursiveGraphIterator(self.ir.graph))


def _is_constant(value: ir.Value) -> bool:
    """An initializer or a Constant node's output: what TensorRT takes as a build-time constant."""
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant")


def _type_name(value: ir.Value) -> str | None:
    t = value.dtype if value.dtype is not None else constant_type(value)
    return onnx.TensorProto.DataType.Name(t) if t else None


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


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name or node.outputs[0].name}'"


def _dynamic_dim(value: ir.Value) -> tuple[int, str] | None:
    """The first dimension of ``value`` that is not a fixed positive number, and what it is instead."""
    for i, d in enumerate(value.shape):
        if isinstance(d, int) and d > 0:
            continue
        return i, (d.value if isinstance(d, ir.SymbolicDim) else None) or "unknown"
    return None


def static_shape_findings(model: ir.Model) -> list[Finding]:
    """Every dimension fixed: graph inputs/outputs and every intermediate tensor after inference."""
    g = model.graph
    tensors = [v for node in g for v in node.outputs]
    out, seen = [], set()
    for kind, values in (("input", g.inputs), ("output", g.outputs), ("tensor", tensors)):
        for v in values:
            if v.name in seen or not isinstance(v.type, ir.TensorType) or v.shape is None:
                continue
            seen.add(v.name)
            dynamic = _dynamic_dim(v)
            if dynamic is None:
                continue
            what = f"dimension {dynamic[0]} of {kind} '{v.name}' is {dynamic[1]} (dynamic)"
            if v.producer() is not None:
                where = _label(v.producer())
            else:
                where = ", ".join(_label(u.node) for u in v.uses()[:2]) or f"{kind} '{v.name}'"
            out.append(Finding("static-shapes", where, what + "; export with fixed shapes"))
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
            value = node.inputs[idx] if len(node.inputs) > idx else None
            if value is not None and not _is_constant(value):
                out.append(Finding("operators", where, f"input '{name}' must be a build-time constant "
                                                       "(initializer or Constant) for TensorRT"))
        out += [Finding("operators", where, m) for m in _attribute_limits(node, t)]
    return out


def _first(value: np.ndarray) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def _attribute_limits(node: ir.Node, t: Target) -> list[str]:
    """Per-operator restrictions from the support tables that a static check can see."""
    op, a = node.op_type, node.attributes
    if op == "TopK":
        out = [] if a.get_int("sorted", 1) == 1 else ["TopK 'sorted' must be 1"]
        k = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if k is not None and _first(k) >= TOPK_MAX_K:
            out.append(f"TopK K={_first(k)} must be less than {TOPK_MAX_K}")
        return out
    if op == "LayerNormalization" and any(v.name for v in node.outputs[1:]):
        return ["only LayerNormalization's first output Y is supported"]
    if op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].name:
        return ["MaxPool 'Indices' output is unsupported"]
    if op in ("MaxPool", "AveragePool", "LpPool") and any(d != 1 for d in a.get_ints("dilations", [])):
        return [f"{op} 'dilations' must be empty or all ones"]
    if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        training = constant(node.inputs[2])
        if training is None or bool(np.asarray(training).reshape(-1)[0]):
            return ["Dropout 'training_mode' must be a constant False"]
    if op == "ScatterND" and a.get_string("reduction", "none") != "none":
        return ["ScatterND 'reduction' other than none is unsupported"]
    if op == "Einsum" and t.major_minor < (10, 12) and "..." in a.get_string("equation", ""):
        return ["Einsum ellipsis is unsupported before TensorRT 10.12"]
    if op == "Constant" and any(name in ("sparse_value", "value_string", "value_strings") for name in a):
        return ["Constant 'sparse_value' and string values are unsupported"]
    if op == "Resize":
        out = []
        if a.get_string("mode", "nearest") not in ("nearest", "linear"):
            out.append("Resize mode must be nearest or linear")
        ctm = a.get_string("coordinate_transformation_mode", "half_pixel")
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            out.append(f"Resize coordinate_transformation_mode '{ctm}' is unsupported")
        if a.get_int("antialias", 0):
            out.append("Resize antialiasing is unsupported")
        return out
    if op == "LSTM" and (a.get_int("input_forget", 0) or a.get_int("layout", 0)):
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
        for value in node.outputs:
            kind = _type_name(value)
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


def sparsity_layers(model: onnx.ModelProto, base_dir: Path | None = None) -> list[dict]:
    """Per MatMul/Gemm weight: zeros and whether every group of 4 along K has at most 2 non-zeros
    (the 2:4 layout sparse tensor cores run; TensorRT picks sparse tactics per layer)."""
    out = []
    for node, w in onnx_inspect.matmul_weights(model, base_dir):
        k = w.shape[0]
        dense = k % 4 != 0 or onnx_inspect.nm_violations(w, 2, 4) > 0
        out.append({"node": node.name or node.outputs[0].name, "module": onnx_inspect.torch_scope(node),
                    "shape_kn": list(w.shape), "zeros": round(float((w == 0).mean()), 4), "2:4": not dense})
    return out
