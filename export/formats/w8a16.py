"""w8a16: weight-only INT8 of the targeted Linears (symmetric, per output channel, behind a
DequantizeLinear) with the rest of the graph in FP16 as the fp16 format leaves it (opset 19).

docs/methods/quantization.md §5a (W8A16). No activation ranges, so no calibration: the MatMul/Gemm reads
the dequantized weight and the FP16 activation, halving weight bytes against FP16 at almost no
error (the int8 grid has 255 levels per output channel). No paper: TensorRT's explicit
quantization documentation (§8). After a gptq stage (``bits: 8``) its per-channel scales are stored
as chosen there. Recipe: ``- {type: quantize, format: w8a16, ignore: ["re:.*lm_head"]}``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from ..graph import tidy, to_proto, upgrade_opset
from ..qdq import output_channel_axis
from .base import FORMATS, Format, FormatContext, LayerArgs, Rewritten
from .fp16 import FP32_OPS, to_fp16
from .int8 import FP16_QDQ_OPSET, int8_per_channel


def _dequantized(graph: ir.Graph, weight: ir.Value, axis: int, given: np.ndarray | None) -> ir.Value:
    """INT8 weight and per-channel scales as initializers, and the DequantizeLinear reading them;
    ``given``: [N, 1] scales to store instead of the weight's own."""
    q, scale = int8_per_channel(weight.const_value.numpy().astype(np.float32), axis,
                                None if given is None else given[:, 0])
    name = weight.name
    q_init = ir.val(f"{name}_int8", const_value=ir.tensor(q, name=f"{name}_int8"))
    s_init = ir.val(f"{name}_int8_scale", const_value=ir.tensor(scale, name=f"{name}_int8_scale"))
    graph.register_initializer(q_init)
    graph.register_initializer(s_init)
    dq = ir.node("DequantizeLinear", [q_init, s_init], {"axis": axis},
                 outputs=[ir.Value(name=f"{name}_int8_dq")], name=f"{name}_int8_dq")
    graph.append(dq)
    return dq.outputs[0]


def int8_weight_only(model: onnx.ModelProto, nodes: list[str],
                     scales: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Replace the weight of each MatMul/Gemm named in ``nodes`` by INT8 behind a DequantizeLinear,
    with the [N, 1] ``scales`` given for a node where there are (float32 scales; the FP16
    conversion that follows makes them FP16)."""
    graph = ir.from_proto(upgrade_opset(model, FP16_QDQ_OPSET))
    wanted, done, scales = set(nodes), {}, scales or {}
    for node in list(graph.graph):
        if node.name not in wanted:
            continue
        weight = node.inputs[1]
        if weight.name not in done:  # a weight read by two nodes is quantized once
            done[weight.name] = _dequantized(graph.graph, weight, output_channel_axis(node), scales.get(node.name))
        node.replace_input_with(1, done[weight.name])
    tidy(graph)
    return to_proto(graph)


@FORMATS.register
class W8A16(Format):
    """INT8 weights per output channel, FP16 activations; no calibration."""

    name = "w8a16"
    default_rtol = 0.1  # fp16's 0.05 plus room for the weight rounding (MiniLM: 0.043 measured)

    class Args(LayerArgs):
        format: Literal["w8a16"]

    @property
    def opset(self) -> int:
        return FP16_QDQ_OPSET

    def describe(self) -> str:
        return "w8a16: int8 weight-only per channel, fp16 activations"

    def apply(self, model: onnx.ModelProto, nodes: dict[str, str], context: FormatContext) -> Rewritten:
        out = to_fp16(int8_weight_only(model, list(nodes.values()), context.scales))
        given = sum(n in context.scales for n in nodes.values())
        return Rewritten(out, {"weights": "int8 symmetric per output channel, max|w| / 127"
                                          + (f"; scales chosen by gptq for {given} layers" if given else ""),
                               "activations": "float16", "float_dtype": "float16",
                               "kept_fp32_ops": sorted({n.op_type for n in out.graph.node} & set(FP32_OPS))})
