"""Quantize stage: the exported graph's precision, for TensorRT's strongly typed builds.

Runs after ``export`` and rewrites model.onnx (temp file, then rename): ``fp16`` (casts, norms and
softmax in fp32), ``int8`` (static W8A8 Q/DQ calibrated on the calibration source at the export
shapes, in the layout TensorRT fuses; ``float16: true`` runs the rest, ignored layers included, in
fp16), or ``int4`` (weight-only blocks along K, opset 21). The Q/DQ checker must pass, the pruned
zeros must survive, and the graph is compared with the float PyTorch model with a tolerance that
fits the format. ``targets``/``ignore`` pick the block Linears by torch name, mapped to ONNX nodes
through the exporter's name scopes; SmoothQuant is its own stage, before export.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field, model_validator
from rich.markup import escape

from export import onnx as onnx_export
from export import qdq
from export import quantize as graph
from export.gate import gate
from export.inspect import linear_nodes
from export.trt_targets import TARGETS
from core.errors import RecipeError, StageFailed
from core.targets import select

from .base import (Stage, StageArgs, StageResult, Table, export_inputs, parity_table, tensorrt_headline,
                   tensorrt_table)
from .context import OnnxArtifact, RunContext

# Parity with the float model: max |error| / max |reference| over every output, worst output.
DEFAULT_RTOL = {"fp16": 0.05, "int8": 0.25, "int4": 0.5}
# ORT's MatMul+Add -> Gemm fusion runs before its QDQ fusions (a Gemm with a float bias has no int8
# kernel) and common-subexpression elimination merges the per-reader Q nodes back into one, which
# its s8->u8 conversion cannot handle: with either on, ORT runs the int8 graph in float with extra
# Q/DQ. The artifact is for TensorRT; this only makes ORT's CPU measurement use its int8 kernels.
ORT_DISABLED_OPTIMIZERS = ("MatMulAddFusion", "CommonSubexpressionElimination")
_FORMAT_FIELDS = {"int8": {"calibrate_method", "percentile", "float16"}, "int4": {"group_size", "partial_groups"}}


class QuantizeArgs(StageArgs):
    type: Literal["quantize"]
    format: Literal["fp16", "int8", "int4"]
    targets: list[str] = ["re:.*"]
    ignore: list[str] = []
    calibrate_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(default=99.999, gt=50, le=100)
    float16: bool = False
    group_size: int = Field(default=128, ge=16, le=4096)
    partial_groups: bool = False
    rtol: float | None = Field(default=None, gt=0, le=10)

    @model_validator(mode="after")
    def _check(self):
        for fmt, names in _FORMAT_FIELDS.items():
            stray = sorted(names & self.model_fields_set) if self.format != fmt else []
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to format '{fmt}', not '{self.format}'")
        if self.format == "fp16" and {"targets", "ignore"} & self.model_fields_set:
            raise ValueError("format 'fp16' converts the whole graph; targets/ignore apply to int8 and int4")
        if "percentile" in self.model_fields_set and self.calibrate_method != "percentile":
            raise ValueError("percentile only applies to calibrate_method 'percentile'")
        return self

    @property
    def tolerance(self) -> float:
        return self.rtol or DEFAULT_RTOL[self.format]


class Quantize(Stage):
    type = "quantize"
    Args = QuantizeArgs
    rewrites_onnx = True
    settings = ("export",)

    @classmethod
    def needs_calibration(cls, args):
        return "data" if args.format == "int8" else False

    @classmethod
    def describe(cls, args):
        if args.format == "int8":
            return f"int8 Q/DQ, {args.calibrate_method}" + (" + fp16" if args.float16 else "")
        return f"int4 weight-only, group {args.group_size}" if args.format == "int4" else "fp16"

    def validate(self, recipe, model, adapter, field):
        opset = {"int4": graph.INT4_OPSET, "int8": graph.FP16_QDQ_OPSET if self.args.float16 else 0}.get(self.args.format, 0)
        target = TARGETS[recipe.export.tensorrt.target]
        if opset > target.max_opset:
            able = ", ".join(t.name for t in TARGETS.values() if t.max_opset >= opset)
            raise RecipeError(f"{self.describe(self.args)} needs ONNX opset {opset}, above the {target.max_opset} that "
                              f"TensorRT {target.tensorrt} ({target.name}) parses; set export.tensorrt.target to one "
                              f"of: {able}", field=f"{field}.format")
        if self.args.format == "fp16":
            return
        chosen = self._targets(model, adapter, field)
        if self.args.format == "int4" and not self.args.partial_groups:
            g = self.args.group_size
            bad = [n for n, m in chosen.items() if m.in_features % g]
            if bad:
                width = chosen[bad[0]].in_features
                raise RecipeError(
                    f"group_size {g} does not divide the input width {width} of {bad[0]} ({len(bad)} layers); use a "
                    f"group size that divides it, or set 'partial_groups: true' to give each row a shorter last "
                    f"group (valid ONNX; TensorRT support unverified)", field=f"{field}.group_size")

    @staticmethod
    def _candidates(model, adapter) -> dict:
        return {name: model.get_submodule(name) for b in adapter.blocks(model) for name in b.linears}

    def _targets(self, model, adapter, field: str) -> dict:
        return select(self._candidates(model, adapter), self.args.targets, self.args.ignore, field)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        args = self.args
        model = onnx.load(ctx.onnx.path)
        if any(n.op_type in qdq.QDQ_OPS for n in model.graph.node) or any(
                i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
            raise StageFailed(f"{ctx.onnx.path.name} already carries reduced precision (an interrupted run?); "
                              "rerun with --force", field=f"stages[{ctx.stage_index}]")
        work = folder / "work"
        work.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        details: dict = {"format": args.format}
        if args.format == "fp16":
            out = graph.to_fp16(model)
            details["kept_fp32_ops"] = sorted({n.op_type for n in out.graph.node} & set(graph.FP32_OPS))
        else:
            candidates = self._candidates(ctx.model, ctx.adapter)
            nodes = self._nodes(ctx, model)
            details.update({"layers": len(nodes), "kept_float": sorted(set(candidates) - set(nodes))})
            if args.format == "int8":
                out = self._int8(ctx, folder, work, nodes, details)
            else:
                out = graph.int4_weight_only(model, nodes.values(), args.group_size)
                details.update(self._int4_details(ctx, nodes))
        out.ir_version = onnx_export.IR_VERSION
        details["seconds"] = round(time.perf_counter() - t0, 3)
        result = self._check_and_place(ctx, folder, work, out, details)
        shutil.rmtree(work)
        return result

    def _nodes(self, ctx: RunContext, model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
        """torch name -> ONNX node for every targeted Linear; a target missing from the graph is an error."""
        chosen = self._targets(ctx.model, ctx.adapter, f"stages[{ctx.stage_index}]")
        found = linear_nodes(model)
        missing = [n for n in chosen if n not in found]
        if missing:
            raise StageFailed(f"{len(missing)} targeted layers have no MatMul/Gemm with a constant weight in the "
                              f"graph (e.g. {missing[0]})", field=f"stages[{ctx.stage_index}].targets")
        return {n: found[n] for n in chosen}

    def _int8(self, ctx: RunContext, folder: Path, work: Path, nodes: dict, details: dict) -> onnx.ModelProto:
        args = self.args
        names = ctx.task_model().input_names
        samples = export_inputs(ctx, ctx.recipe.calibration.num_samples)
        feeds = [{n: t.numpy() for n, t in zip(names, s)} for s in samples]
        ranges = folder / "calibration_ranges.json"
        task = ctx.events.task(f"int8 ranges ({args.calibrate_method}) over {len(feeds)} samples", total=len(feeds))
        graph.calibrate(ctx.onnx.path, feeds, args.calibrate_method, args.percentile, ranges, work, task.advance)
        task.done()
        graph.int8_qdq(ctx.onnx.path, work / "int8.onnx", [n.name for n in nodes.values()], ranges,
                       args.calibrate_method)
        out = onnx.load(work / "int8.onnx")
        details["float_readers_restored"] = qdq.restrict_to_compute_inputs(out)
        if args.float16:
            out = graph.to_fp16(graph.upgrade_opset(out, graph.FP16_QDQ_OPSET))
        details.update({"calibration": {"method": args.calibrate_method, "samples": len(feeds),
                                        "shape": list(samples[0][0].shape), "ranges": ranges.name,
                                        **({"percentile": args.percentile} if args.calibrate_method == "percentile"
                                           else {})},
                        "activations": "int8 symmetric per tensor", "weights": "int8 symmetric per output channel",
                        "float_dtype": "float16" if args.float16 else "float32"})
        return out

    def _int4_details(self, ctx: RunContext, nodes: dict) -> dict:
        g = self.args.group_size
        widths = sorted({ctx.model.get_submodule(n).in_features for n in nodes})
        partial = {str(k): f"last group has {k % g} weights" for k in widths if k % g}
        return {"group_size": g, "symmetric": True, "scale": "max|w| / 7 per group of K", "input_widths": widths,
                "partial_groups": partial or None}

    def _check_and_place(self, ctx: RunContext, folder: Path, work: Path, out: onnx.ModelProto,
                         details: dict) -> StageResult:
        """The gate on a staged copy; model.onnx is replaced only if it passes, so a failed stage leaves
        the float graph for --resume."""
        args, where, onnx_path = self.args, f"stages[{ctx.stage_index}]", ctx.onnx.path
        staged = work / onnx_path.name
        onnx_export.save(out, staged, external=onnx_export.file_bytes(onnx_path) > onnx_export.EXTERNAL_DATA_BYTES)
        onnx.checker.check_model(str(staged), full_check=True)
        module = ctx.task_model()
        info = ctx.onnx.info
        report = gate(out, staged, onnx_path, module, export_inputs(ctx), args.tolerance, ctx.sparsity,
                      ctx.recipe.export.tensorrt, folder, info, field=where, rtol_field=f"{where}.rtol", target_field=where,
                      log=lambda m: ctx.events.log(escape(m)))
        details.update({"checker": report.qdq.as_dict(), "parity": {**report.parity.as_dict(), "rtol": args.tolerance},
                        "sparsity_check": report.sparsity})
        opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
        info.update({"opset": opset, "nodes": len(out.graph.node), "ops": sorted({n.op_type for n in out.graph.node}),
                     "bytes": onnx_export.file_bytes(onnx_path), "quantization": details, "tensorrt": report.tensorrt})
        if args.format == "int8":
            ctx.onnx.disabled_optimizers = ORT_DISABLED_OPTIMIZERS
        ctx.onnx.save(folder / "onnx.json")
        rows = [[n["module"], n["op"], n["scheme"],
                 ", ".join(f"{k}: {v['dtype']} {v['granularity']}" for k, v in n["inputs"].items())]
                for n in report.qdq.nodes]
        metrics = {"format": args.format, "opset": opset, "bytes": info["bytes"],
                   "quantized_ops": len(report.qdq.nodes), "parity": details["parity"],
                   "sparsity_check": report.sparsity, "tensorrt": tensorrt_headline(report.tensorrt)}
        return StageResult(metrics, [
            Table("Precision", ["key", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                  for k, v in details.items() if k not in ("checker", "parity")]),
            Table("Quantized ops (Q/DQ placement)", ["module", "op", "scheme", "inputs"], rows),
            parity_table("Parity with the float PyTorch model (ONNX Runtime, CPU)", details["parity"]),
            tensorrt_table(report.tensorrt)])

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.onnx = OnnxArtifact.load(ctx.onnx.path, folder / "onnx.json")
