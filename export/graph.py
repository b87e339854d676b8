"""Graph edits through onnx_ir: the ONNX proto in, edits on the IR, the proto out.

onnx_ir's values know their producer and their uses, so rewrites (precision formats, Q/DQ
placement) and checks read the graph without name-indexed dicts rebuilt by hand, and its passes
order the nodes and drop what nobody reads, in subgraphs too. Protos stay the boundary type:
ONNX Runtime's converters and the file I/O take them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import version_converter
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from .onnx import IR_VERSION


def _const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a Constant with a sparse value: no dense constant to read
        return None


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output; None when computed at run time."""
    tensor = _const_tensor(value)
    return tensor.numpy() if tensor is not None else None


def constant_type(value: ir.Value | None) -> int | None:
    """The element type of an initializer or a Constant node's output (an ONNX TensorProto type)."""
    tensor = _const_tensor(value)
    return int(tensor.dtype) if tensor is not None else None


def tidy(model: ir.Model) -> None:
    """Order nodes so every input is produced before it is read (rewrites insert nodes anywhere), then
    drop nodes whose outputs nobody reads and initializers nobody reads."""
    TopologicalSortPass()(model)
    RemoveUnusedNodesPass()(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The proto at the IR version ONNX Runtime takes (onnx's own default is newer than it reads)."""
    proto = ir.to_proto(model)
    proto.ir_version = IR_VERSION
    return proto


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model at ``version`` (no-op if already there), keeping each node's torch scope metadata."""
    if opset(model) >= version:
        return model
    meta = {n.name: list(n.metadata_props) for n in model.graph.node}
    out = version_converter.convert_version(model, version)
    for node in out.graph.node:
        node.metadata_props.extend(meta.get(node.name, []))
    out.ir_version = IR_VERSION
    return out
