"""int8: static W8A8 Q/DQ in the layout TensorRT fuses, calibrated on the recipe's calibration source.

docs/methods/quantization.md §3.1-§3.4: ONNX Runtime ``quantize_static`` with TensorRT's settings
(signed symmetric INT8, per-channel weights on the output-channel axis, Q/DQ only on
MatMul/Gemm/Conv inputs, float biases, one Q/DQ pair per reader), calibrated here so that entropy
gets TensorRT's 2048-bin histogram (``quantize_static`` would use 128 bins, where entropy
degenerates to min-max); then every non-compute reader gets the float tensor back (§3.2). Weights
a gptq stage (``bits: 8``) put on its per-channel grid get their integers and scales from there.
``float16: true`` runs the rest of the graph, ignored layers included, in FP16 (fp16.py).
No paper: TensorRT's "Explicit Quantization" guide and ONNX Runtime's quantization docs (§8).
Recipe: ``- {type: quantize, format: int8, calibrate_method: entropy, ignore: ["re:.*output.dense$"]}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from pydantic import Field, model_validator

from core.errors import StageFailed

from ..graph import to_proto, upgrade_opset
from ..qdq import COMPUTE_OPS, output_channel_axis, restrict_to_compute_inputs
from .base import FORMATS, Format, FormatContext, LayerArgs, Rewritten, on_grid
from .fp16 import to_fp16

FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear with float16 scales
CALIBRATION_CHUNK = 8  # samples whose intermediate tensors ONNX Runtime's calibrators hold at once
RANGES = "calibration_ranges.json"


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


def int8_per_channel(w: np.ndarray, axis: int, scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 of ``w`` with one scale per index of ``axis`` (the output channel):
    scale = max|w| / 127 over the other axis, q = clip(round(w / scale), -127, 127); an all-zero
    channel (pruned) gets scale 1 so every scale is positive, as TensorRT requires. ``scale``: the
    per-channel scales a stage already rounded the weights with (gptq), used as given.
    ONNX Runtime's symmetric per-channel weights are this grid too (w8a16.py uses it directly)."""
    given = scale is not None
    if scale is None:
        scale = np.abs(w).max(axis=1 - axis) / 127.0
        scale[scale == 0] = 1.0
    elif scale.shape != (w.shape[axis],):
        raise StageFailed(f"given int8 scales {scale.shape} do not fit {w.shape[axis]} output channels")
    shaped = scale[None, :] if axis == 1 else scale[:, None]
    q = on_grid(w, shaped, -127, 127, "int8") if given else np.clip(np.rint(w / shaped), -127, 127)
    return q.astype(np.int8), scale.astype(np.float32)


def given_weight_scales(model: ir.Model, source: onnx.ModelProto, scales: dict[str, np.ndarray]) -> int:
    """Replace the int8 weights and scales ``quantize_static`` wrote for the nodes in ``scales``
    (node name -> [N, 1]) by the float weights of ``source`` on those scales: ONNX Runtime takes
    max|w| / 127 of weights already on a grid whose largest level may be below 127, and would
    round them a second time. Returns how many weights were replaced."""
    floats = {i.name: i for i in source.graph.initializer}
    weight_of = {n.name: n.input[1] for n in source.graph.node if n.name in scales}
    nodes = {n.name: n for n in model.graph if n.name in scales}
    for name, given in scales.items():
        node, axis = nodes[name], output_channel_axis(nodes[name])
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or dq.attributes.get_int("axis", 1) != axis:
            raise StageFailed(f"{name}: ONNX Runtime did not quantize its weight per output channel (axis {axis})")
        q, scale = int8_per_channel(numpy_helper.to_array(floats[weight_of[name]]).astype(np.float32), axis,
                                    given[:, 0])
        dq.inputs[0].const_value = ir.tensor(q, name=dq.inputs[0].name)
        dq.inputs[1].const_value = ir.tensor(scale, name=dq.inputs[1].name)
    return len(scales)


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


@FORMATS.register
class Int8(Format):
    """INT8 weights (per output channel) and activations (per tensor) of the targeted Linears."""

    name = "int8"
    default_rtol = 0.25
    calibration = True
    # ORT's MatMul+Add -> Gemm fusion runs before its QDQ fusions (a Gemm with a float bias has no int8
    # kernel) and common-subexpression elimination merges the per-reader Q nodes back into one, which
    # its s8->u8 conversion cannot handle: with either on, ORT runs the int8 graph in float with extra
    # Q/DQ. The artifact is for TensorRT; this only makes ORT's CPU measurement use its int8 kernels.
    ort_disabled_optimizers = ("MatMulAddFusion", "CommonSubexpressionElimination")

    class Args(LayerArgs):
        format: Literal["int8"]
        calibrate_method: Literal["minmax", "percentile", "entropy"] = "minmax"
        percentile: float = Field(default=99.999, gt=50, le=100)
        float16: bool = False

        @model_validator(mode="after")
        def _percentile_needs_its_method(self):
            if "percentile" in self.model_fields_set and self.calibrate_method != "percentile":
                raise ValueError("percentile only applies to calibrate_method 'percentile'")
            return self

    @property
    def opset(self) -> int:
        return FP16_QDQ_OPSET if self.args.float16 else 0

    def describe(self) -> str:
        return f"int8 Q/DQ, {self.args.calibrate_method}" + (" + fp16" if self.args.float16 else "")

    def apply(self, model: onnx.ModelProto, nodes: dict[str, str], context: FormatContext) -> Rewritten:
        args, feeds = self.args, context.samples
        ranges = context.folder / RANGES
        task = context.events.task(f"int8 ranges ({args.calibrate_method}) over {len(feeds)} samples",
                                   total=len(feeds))
        calibrate(context.source, feeds, args.calibrate_method, args.percentile, ranges, context.work, task.advance)
        task.done()
        int8_qdq(context.source, context.work / "int8.onnx", list(nodes.values()), ranges, args.calibrate_method)
        graph = ir.from_proto(onnx.load(context.work / "int8.onnx"))  # weights in memory, not in work/
        restored = restrict_to_compute_inputs(graph)
        given = given_weight_scales(graph, model, {n: context.scales[n] for n in nodes.values() if n in context.scales})
        out = to_proto(graph)
        if args.float16:
            out = to_fp16(upgrade_opset(out, FP16_QDQ_OPSET))
        calibration = {"method": args.calibrate_method, "samples": len(feeds),
                       "shape": list(next(iter(feeds[0].values())).shape), "ranges": ranges.name,
                       **({"percentile": args.percentile} if args.calibrate_method == "percentile" else {})}
        return Rewritten(out, {"float_readers_restored": restored, "calibration": calibration,
                               "activations": "int8 symmetric per tensor",
                               "weights": "int8 symmetric per output channel"
                                          + (f"; scales chosen by gptq for {given} layers" if given else ""),
                               "float_dtype": "float16" if args.float16 else "float32"})
