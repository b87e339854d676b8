"""Graph precision on an exported ONNX model: FP16 with casts, INT8 Q/DQ, INT4 weight-only DQ.

TensorRT takes precision from the graph in strongly typed builds (docs/methods/quantization.md §1), so each
format is a rewrite of the float graph:

- ``to_fp16``: ONNX Runtime's float16 converter, graph inputs/outputs kept float32, and LayerNorm,
  Softmax and the reductions/powers of decomposed norms kept in float32 (quantization.md §2: a decomposed norm's
  ``Pow`` overflows in FP16).
- ``int8_qdq``: ONNX Runtime ``quantize_static`` with the TensorRT settings of quantization.md §3.3 (signed symmetric
  INT8, per-channel weights on the output-channel axis, Q/DQ only on MatMul/Gemm/Conv inputs, float
  biases, one Q/DQ pair per reader), calibrated here so that entropy gets TensorRT's 2048-bin
  histogram (``quantize_static`` would use 128 bins, where entropy degenerates to min-max).
- ``int4_weight_only``: symmetric INT4 blocks along K behind a blocked DequantizeLinear (opset 21).
  Written here rather than with ONNX Runtime's ``MatMulNBitsQuantizer``, whose symmetric QDQ path
  maps each block's signed extreme to -8 and so stores negative scales; we keep ModelOpt's
  convention (scale = max|w| / 7, positive) and the nodes' torch scopes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from .onnx import IR_VERSION
from .qdq import COMPUTE_OPS, output_channel_axis, remove_dead

# Kept in float32 in FP16 graphs: normalisation, softmax, and the ops of decomposed norms whose
# intermediate values overflow FP16 (x^2 of activations in the hundreds).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Reciprocal")
INT4_OPSET = 21  # blocked DequantizeLinear and the INT4 type
FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear with float16 scales
CALIBRATION_CHUNK = 8  # samples whose intermediate tensors ONNX Runtime's calibrators hold at once


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before it is read (converters append casts at the end)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model at ``version`` (no-op if already there), keeping each node's torch scope metadata."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    meta = {n.name: list(n.metadata_props) for n in model.graph.node}
    out = version_converter.convert_version(model, version)
    for node in out.graph.node:
        node.metadata_props.extend(meta.get(node.name, []))
    out.ir_version = IR_VERSION
    return out


def to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = FP32_OPS) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = {*DEFAULT_OP_BLOCK_LIST, *keep_fp32}
    out = convert_float_to_float16(model, keep_io_types=True, op_block_list=sorted(blocked))
    # The converter adds one identical Cast per reader of a shared float32 constant; keep the first.
    seen, unique = set(), []
    for node in out.graph.node:
        if tuple(node.output) not in seen:
            seen.add(tuple(node.output))
            unique.append(node)
    del out.graph.node[:]
    out.graph.node.extend(unique)
    _drop_cast_round_trips(out.graph, blocked)
    # Its value_info types can disagree with what the casts produce; intermediate types are optional.
    del out.graph.value_info[:]
    toposort(out.graph)
    remove_dead(out)
    out.ir_version = IR_VERSION
    return out


def _drop_cast_round_trips(graph: onnx.GraphProto, fp32_ops: set[str]) -> None:
    """Between two float32 ops the converter still passes through float16 (Cast to fp16, Cast back):
    a decomposed RMSNorm's x^2 overflows there. Read the float32 op's output directly instead."""
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node, dtype):
        return node.op_type == "Cast" and node.attribute[0].i == dtype

    for node in graph.node:
        for i, name in enumerate(node.input):
            back = producer.get(name)
            if back is None or not cast_to(back, onnx.TensorProto.FLOAT):
                continue
            down = producer.get(back.input[0])
            if down is None or not cast_to(down, onnx.TensorProto.FLOAT16):
                continue
            source = producer.get(down.input[0])
            if source is not None and source.op_type in fp32_ops:
                node.input[i] = down.input[0]


@contextlib.contextmanager
def _quiet_ort():
    """onnxruntime.quantization logs advice (pre-processing) on the root logger and prints progress."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def calibrate(src: Path, feeds: list[dict[str, np.ndarray]], method: str, percentile: float, ranges: Path,
              work: Path, on_chunk: Callable[[int], None] | None = None) -> None:
    """Per-tensor symmetric ranges of every MatMul/Gemm/Conv input, saved where ``quantize_static`` reads them.
    ``on_chunk(n)`` is called after every n samples (progress)."""
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    options = {"minmax": {"symmetric": True},
               "percentile": {"symmetric": True, "num_bins": 2048, "percentile": percentile},
               "entropy": {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128}}[method]
    with _quiet_ort():
        calibrator = create_calibrator(src, list(COMPUTE_OPS), augmented_model_path=str(work / "augmented.onnx"),
                                       calibrate_method=_method(method), extra_options=options)
        for i in range(0, len(feeds), CALIBRATION_CHUNK):
            chunk = feeds[i:i + CALIBRATION_CHUNK]
            calibrator.collect_data(_Reader(chunk))
            if on_chunk:
                on_chunk(len(chunk))
        save_tensors_data(calibrator.compute_data(), ranges)


def int8_qdq(src: Path, dst: Path, nodes: list[str], ranges: Path, method: str) -> None:
    """Q/DQ on the inputs of ``nodes`` (names of MatMul/Gemm/Conv nodes) from the ranges ``calibrate`` saved."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with _quiet_ort():
        quantize_static(
            src, dst, None, quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=list(COMPUTE_OPS),
            nodes_to_quantize=nodes, calibration_cache_path=ranges,
            calibrate_method=_method(method),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "OpTypesToExcludeOutputQuantization": list(COMPUTE_OPS), "DedicatedQDQPair": True})


def int4_blocks(w_kn: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 of a [K, N] weight in blocks of ``block`` along K: per (block, column)
    scale = max|w| / 7 and q = clip(round(w / scale), -8, 7), so q * scale is the nearest grid point
    and zeros stay zeros. When K is not a multiple of ``block`` the last block has fewer weights.
    Returns q [K, N] (int8 holding int4 values) and scales [ceil(K / block), N]."""
    k, n = w_kn.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w_kn
    grouped = padded.reshape(blocks, block, n)
    scale = np.abs(grouped).max(1) / 7.0
    scale[scale == 0] = 1.0  # an all-zero block (pruned) quantizes to zeros with any scale
    q = np.clip(np.rint(grouped / scale[:, None, :]), -8, 7).reshape(blocks * block, n)[:k]
    return q.astype(np.int8), scale.astype(np.float32)


def int4_weight_only(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto], block: int) -> onnx.ModelProto:
    """Replace the weight of each MatMul/Gemm in ``nodes`` by INT4 blocks behind a DequantizeLinear."""
    model = upgrade_opset(model, INT4_OPSET)
    wanted = {n.name for n in nodes}
    inits = {i.name: i for i in model.graph.initializer}
    dq_nodes, done = [], set()
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        name = node.input[1]
        k_axis = 1 - output_channel_axis(node)  # 0 for MatMul [K, N], 1 for Gemm transB=1 [N, K]
        if name not in done:  # a weight read by two nodes is quantized once
            done.add(name)
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            q, scale = int4_blocks(w if k_axis == 0 else w.T, block)
            if k_axis == 1:
                q, scale = q.T, scale.T
            model.graph.initializer.extend([numpy_helper.from_array(q.astype(ml_dtypes.int4), f"{name}_int4"),
                                            numpy_helper.from_array(scale, f"{name}_int4_scale")])
            dq_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int4", f"{name}_int4_scale"],
                                             [f"{name}_int4_dq"], name=f"{name}_int4_dq", axis=k_axis,
                                             block_size=block))
        node.input[1] = f"{name}_int4_dq"
    model.graph.node.extend(dq_nodes)
    toposort(model.graph)
    remove_dead(model)
    return model
