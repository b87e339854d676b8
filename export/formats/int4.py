"""int4: weight-only INT4 of the targeted Linears, symmetric blocks along K behind a blocked
DequantizeLinear (opset 21).

docs/methods/quantization.md §5. Written here rather than with ONNX Runtime's
``MatMulNBitsQuantizer``, whose symmetric QDQ path maps each block's signed extreme to -8 and so
stores negative scales; we keep ModelOpt's convention (scale = max|w| / 7, positive) and the
nodes' torch scopes. No paper: TensorRT's and ModelOpt's INT4 documentation (§8). After a gptq
stage the weights already lie on this grid and its scales are stored as chosen there.
Recipe: ``- {type: quantize, format: int4, group_size: 128}`` (with a TensorRT 10.x x86 target:
the Orin's parser stops at opset 20).
"""

from __future__ import annotations

from typing import Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field

from core.errors import RecipeError, StageFailed

from ..graph import tidy, to_proto, upgrade_opset
from ..qdq import output_channel_axis
from .base import FORMATS, Format, FormatContext, LayerArgs, Rewritten, on_grid

INT4_OPSET = 21  # blocked DequantizeLinear and the INT4 type


def int4_blocks(w_kn: np.ndarray, block: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 of a [K, N] weight in blocks of ``block`` along K: per (block, column)
    scale = max|w| / 7 and q = clip(round(w / scale), -8, 7), so q * scale is the nearest grid point
    and zeros stay zeros. When K is not a multiple of ``block`` the last block has fewer weights.
    ``scale`` [ceil(K / block), N]: scales a stage already rounded the weights with (gptq), used as given.
    Returns q [K, N] (int8 holding int4 values) and scales [ceil(K / block), N]."""
    k, n = w_kn.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w_kn
    grouped = padded.reshape(blocks, block, n)
    if scale is None:
        scale = np.abs(grouped).max(1) / 7.0
        scale[scale == 0] = 1.0  # an all-zero block (pruned) quantizes to zeros with any scale
        q = np.clip(np.rint(grouped / scale[:, None, :]), -8, 7)
    else:
        if scale.shape != (blocks, n):
            raise StageFailed(f"given int4 scales {scale.shape} do not fit a [{k}, {n}] weight in blocks of {block}")
        q = on_grid(grouped, scale[:, None, :], -8, 7, "int4")
    return q.reshape(blocks * block, n)[:k].astype(np.int8), scale.astype(np.float32)


def _dequantized(graph: ir.Graph, weight: ir.Value, k_axis: int, block: int, given: np.ndarray | None) -> ir.Value:
    """INT4 blocks and scales of ``weight`` as initializers, and the DequantizeLinear reading them;
    ``given``: [N, blocks] scales to store instead of the weight's own."""
    w = weight.const_value.numpy().astype(np.float32)
    q, scale = int4_blocks(w if k_axis == 0 else w.T, block, None if given is None else given.T)
    if k_axis == 1:
        q, scale = q.T, scale.T
    name = weight.name
    q_init = ir.val(f"{name}_int4", const_value=ir.tensor(q.astype(ml_dtypes.int4), name=f"{name}_int4"))
    s_init = ir.val(f"{name}_int4_scale", const_value=ir.tensor(scale, name=f"{name}_int4_scale"))
    graph.register_initializer(q_init)
    graph.register_initializer(s_init)
    dq = ir.node("DequantizeLinear", [q_init, s_init], {"axis": k_axis, "block_size": block},
                 outputs=[ir.Value(name=f"{name}_int4_dq")], name=f"{name}_int4_dq")
    graph.append(dq)
    return dq.outputs[0]


def int4_weight_only(model: onnx.ModelProto, nodes: list[str], block: int,
                     scales: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list[int]]:
    """Replace the weight of each MatMul/Gemm named in ``nodes`` by INT4 blocks behind a
    DequantizeLinear, with the [N, blocks] ``scales`` given for a node where there are.
    Returns the model and the input widths (K) of the rewritten weights."""
    graph = ir.from_proto(upgrade_opset(model, INT4_OPSET))
    wanted, done, widths, scales = set(nodes), {}, set(), scales or {}
    for node in list(graph.graph):
        if node.name not in wanted:
            continue
        weight = node.inputs[1]
        k_axis = 1 - output_channel_axis(node)  # 0 for MatMul [K, N], 1 for Gemm transB=1 [N, K]
        widths.add(weight.const_value.shape[k_axis])
        if weight.name not in done:  # a weight read by two nodes is quantized once
            done[weight.name] = _dequantized(graph.graph, weight, k_axis, block, scales.get(node.name))
        node.replace_input_with(1, done[weight.name])
    tidy(graph)  # the DequantizeLinear nodes were appended; the float weights lost their readers
    return to_proto(graph), sorted(widths)


@FORMATS.register
class Int4(Format):
    """INT4 weights in blocks of ``group_size`` along K; activations stay float."""

    name = "int4"
    default_rtol = 0.5

    class Args(LayerArgs):
        format: Literal["int4"]
        group_size: int = Field(default=128, ge=16, le=4096)
        partial_groups: bool = False  # allow a shorter last group where group_size does not divide K

    @property
    def opset(self) -> int:
        return INT4_OPSET

    def describe(self) -> str:
        return f"int4 weight-only, group {self.args.group_size}"

    def check_layers(self, widths: dict[str, int], field: str) -> None:
        g = self.args.group_size
        bad = [n for n, k in widths.items() if k % g]
        if bad and not self.args.partial_groups:
            raise RecipeError(
                f"group_size {g} does not divide the input width {widths[bad[0]]} of {bad[0]} ({len(bad)} layers); "
                f"use a group size that divides it, or set 'partial_groups: true' to give each row a shorter last "
                f"group (valid ONNX; TensorRT support unverified)", field=f"{field}.group_size")

    def width_divisor(self) -> tuple[int, str, str] | None:
        if self.args.partial_groups:
            return None
        return self.args.group_size, "group_size", ", or set 'partial_groups: true' (TensorRT support unverified)"

    def apply(self, model: onnx.ModelProto, nodes: dict[str, str], context: FormatContext) -> Rewritten:
        g = self.args.group_size
        out, widths = int4_weight_only(model, list(nodes.values()), g, context.scales)
        partial = {str(k): f"last group has {k % g} weights" for k in widths if k % g}
        given = sum(n in context.scales for n in nodes.values())
        scale = "max|w| / 7 per group of K" + (f"; chosen by gptq for {given} layers" if given else "")
        return Rewritten(out, {"group_size": g, "symmetric": True, "scale": scale,
                               "input_widths": widths, "partial_groups": partial or None})
