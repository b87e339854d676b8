"""TensorRT deployment targets and the ONNX operators each one's parser imports.

Operator sets are transcribed (names only) from the ONNX-TensorRT support matrix,
onnx/onnx-tensorrt ``docs/operators.md``, at the branch of each TensorRT release, plus the
parser CHANGELOG for releases without their own table:

- TensorRT 8.5: branch ``release/8.5-GA`` ("supports operators up to Opset 17"). No
  LayerNormalization (added in 8.6 EA), TopK ``K`` must be an initializer.
- TensorRT 10.3: branch ``release/10.1-GA`` (the 10.x table: "opset 9 to opset 20"); the
  CHANGELOG for 10.2 and 10.3 adds no operator, and 10.3 lifts "Slice ``axes`` must be an
  initializer" ("Added support for tensor axes inputs for Slice nodes").
- TensorRT 10.15: the table at ``main`` for 10.15 ("opset 9 to opset 24"); versus 10.1 it adds
  the window functions and STFT (10.4/10.5), Attention (10.14), RMSNormalization,
  RotaryEmbedding and TensorScatter (10.15); 10.4 lifts "Pad ``axes`` must be an initializer".
- TensorRT 11.x: no per-release table was available to us; NVIDIA's ONNX opset guide gives the
  11.x parser's range as opset 9 to 25 (25 from 11.5, per the 11.5 release notes), so 11.4
  (PyPI's current 11.x) is modelled with the 10.15 operator set and opset 24 — a deliberate
  approximation, recorded in the manifest as ``operator_table``.

An operator missing from a set is treated as unsupported (the tables mark it "N" or do not
list it); custom domains (``com.microsoft`` contrib ops, plugins) are never assumed present.
"""

from __future__ import annotations

from dataclasses import dataclass

_TRT8_5 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample HardSigmoid HardSwish
Identity If ImageScaler InstanceNormalization IsNaN LRN LSTM LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
_TRT10_3 = _TRT8_5 | {"CastLike", "DeformConv", "Gelu", "GroupNormalization", "Hardmax", "IsInf",
                      "LayerNormalization", "Mish"}
_TRT10_15 = _TRT10_3 | {"Attention", "BlackmanWindow", "HammingWindow", "HannWindow", "RMSNormalization",
                        "RotaryEmbedding", "STFT", "TensorScatter"}


@dataclass(frozen=True)
class Target:
    """One deployment target: a TensorRT release, its ONNX parser's limits, and the hardware."""

    name: str
    tensorrt: str
    operator_table: str  # where the operator set was transcribed from
    max_opset: int
    operators: frozenset[str]
    platform: str
    compute_capability: str | None  # None: any desktop GPU the release supports
    # Inputs the parser takes only as build-time constants (initializer or Constant node),
    # by operator: input index -> its name in the table's wording.
    constant_inputs: tuple[tuple[str, int, str], ...]
    quantized_types: frozenset[str]  # element types a DequantizeLinear may read

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor = self.tensorrt.split(".")[:2]
        return int(major), int(minor)


# Inputs every table in use requires as constants (operators.md "must be an initializer" /
# "must be a build-time constant" / "must be resolvable to a constant"). TopK's K is constant
# only in 8.5's table (8.6 EA added dynamic K); we require it everywhere because the project's
# graphs are static (the rule "TopK K constant and < 3840").
_CONSTANT_ALWAYS = (("TopK", 1, "K"), ("CumSum", 1, "axis"), ("Squeeze", 1, "axes"), ("Unsqueeze", 1, "axes"),
                    *((op, 1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                                 "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
                                                 "ReduceSumSquare")),
                    ("OneHot", 1, "depth"))
_SLICE_AXES = ("Slice", 3, "axes")  # constant until 10.3
_PAD_AXES = ("Pad", 3, "axes")  # constant until 10.4

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("jetson-orin-jp5", "8.5.2", "onnx-tensorrt release/8.5-GA docs/operators.md", 17, _TRT8_5,
           "aarch64 JetPack 5.1 (L4T 35)", "8.7", (*_CONSTANT_ALWAYS, _SLICE_AXES, _PAD_AXES),
           frozenset({"INT8"})),
    Target("jetson-orin-jp6", "10.3.0", "onnx-tensorrt release/10.1-GA docs/operators.md + CHANGELOG 10.2-10.3",
           20, _TRT10_3, "aarch64 JetPack 6.1/6.2 (L4T 36.4)", "8.7", (*_CONSTANT_ALWAYS, _PAD_AXES),
           frozenset({"INT8", "FLOAT8E4M3FN", "INT4"})),
    Target("x86-trt10", "10.15", "onnx-tensorrt docs/operators.md for TensorRT 10.15", 24, _TRT10_15,
           "x86_64 Linux", None, _CONSTANT_ALWAYS, frozenset({"INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1"})),
    Target("x86-trt11", "11.4", "TensorRT 10.15 operators.md (no 11.x table available) + NVIDIA opset guide", 24,
           _TRT10_15, "x86_64 Linux", None, _CONSTANT_ALWAYS,
           frozenset({"INT8", "FLOAT8E4M3FN", "INT4", "FLOAT4E2M1"})),
)}

TOPK_MAX_K = 3840  # operators.md (10.x): "K input must be less than 3840"
