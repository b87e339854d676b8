"""fp16: the whole graph in FP16 with casts, norms and softmax kept in FP32.

docs/methods/quantization.md §2: ONNX Runtime's float16 converter, graph inputs/outputs kept
float32, and LayerNorm, Softmax and the reductions/powers of decomposed norms kept in float32 (a
decomposed norm's ``Pow`` overflows in FP16). No paper: TensorRT's strongly typed builds and ONNX
Runtime's converter documentation (§8). Recipe: ``- {type: quantize, format: fp16}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import onnx
import onnx_ir as ir

from ..graph import tidy, to_proto
from .base import FORMATS, Format, FormatArgs, FormatContext, Rewritten

# Kept in float32 in FP16 graphs: normalisation, softmax, and the ops of decomposed norms whose
# intermediate values overflow FP16 (x^2 of activations in the hundreds).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Reciprocal")


def to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = FP32_OPS) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = {*DEFAULT_OP_BLOCK_LIST, *keep_fp32}
    out = convert_float_to_float16(model, keep_io_types=True, op_block_list=sorted(blocked))
    # The converter adds one identical Cast per reader of a shared float32 constant; keep the first
    # (before the IR, which needs every value produced once).
    seen, unique = set(), []
    for node in out.graph.node:
        if tuple(node.output) not in seen:
            seen.add(tuple(node.output))
            unique.append(node)
    del out.graph.node[:]
    out.graph.node.extend(unique)
    # Its value_info types can disagree with what the casts produce; intermediate types are optional.
    del out.graph.value_info[:]
    graph = ir.from_proto(out)
    _drop_cast_round_trips(graph.graph, blocked)
    tidy(graph)  # the converter appends its casts at the end
    return to_proto(graph)


def _cast_to(node: ir.Node | None, dtype: ir.DataType) -> bool:
    return node is not None and node.op_type == "Cast" and node.attributes.get_int("to") == dtype


def _drop_cast_round_trips(graph: ir.Graph, fp32_ops: set[str]) -> None:
    """Between two float32 ops the converter still passes through float16 (Cast to fp16, Cast back):
    a decomposed RMSNorm's x^2 overflows there. Read the float32 op's output directly instead."""
    for node in graph:
        for i, value in enumerate(node.inputs):
            back = value.producer() if value is not None else None
            if not _cast_to(back, ir.DataType.FLOAT):
                continue
            down = back.inputs[0].producer()
            if not _cast_to(down, ir.DataType.FLOAT16):
                continue
            source = down.inputs[0].producer()
            if source is not None and source.op_type in fp32_ops:
                node.replace_input_with(i, down.inputs[0])


@FORMATS.register
class Fp16(Format):
    """FP16 weights and activations; the whole graph (no targets/ignore)."""

    name = "fp16"
    default_rtol = 0.05

    class Args(FormatArgs):
        format: Literal["fp16"]

    def apply(self, model: onnx.ModelProto, nodes: dict[str, str], context: FormatContext) -> Rewritten:
        out = to_fp16(model)
        return Rewritten(out, {"kept_fp32_ops": sorted({n.op_type for n in out.graph.node} & set(FP32_OPS))})
