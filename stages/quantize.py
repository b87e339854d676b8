"""Quantize stage: the exported graph's precision, for TensorRT's strongly typed builds.

Runs after ``export`` and rewrites model.onnx (temp file, then rename) in one of the formats of
export/formats (``fp16``, ``int8``, ``int4``; ``format`` picks the member, whose own fields follow
it in the recipe). For every format the stage does the same: ``targets``/``ignore`` pick the block
Linears by torch name, mapped to ONNX nodes through the exporter's name scopes; the recipe's
TensorRT target must parse the opset the format needs; calibration samples are fed when the format
asks; the result passes the one gate (export/gate.py: parity with the float PyTorch model at the
format's tolerance, or for causal LMs perplexity ratio and top-1 token agreement with it; pruned
zeros kept, the Q/DQ layout TensorRT fuses, readiness). Weights a gptq stage put on the format's
grid are stored with its scales (``RunContext.weight_scales``). SmoothQuant is its own stage,
before export. A VLM exported with ``export.decoder`` has its language model's prefill and decode
graphs rewritten (weight-only formats, as for any decoder export); vision.onnx ships as exported.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

import onnx
from rich.markup import escape

from core.errors import RecipeError, StageFailed
from core.registry import stage_args
from core.targets import select
from export import decoder, qdq
from export import onnx as onnx_export
from export.decoder import DECODE
from export.formats import FORMATS, Format, FormatContext, LayerArgs, Rewritten
from export.gate import MAIN, GateGraph, gate
from export.inspect import linear_nodes
from export.trt_targets import TARGETS
from tasks.image_decoder import VISION

from .base import (
    Stage,
    StageArgs,
    StageResult,
    Table,
    check_widths_left,
    export_inputs,
    graph_record,
    parity_table,
    tensorrt_headline,
    tensorrt_table,
    vlm_traced,
)
from .context import OnnxArtifact, RunContext


class QuantizeBase(StageArgs):
    type: Literal["quantize"]


class Quantize(Stage):
    type = "quantize"
    Args = stage_args(FORMATS, QuantizeBase)
    rewrites_onnx = True
    replaces = ("model.onnx", "model.onnx.data", f"{DECODE}.onnx", "build")
    settings = ("export",)

    def __init__(self, args):
        super().__init__(args)
        self.format: Format = FORMATS[args.format](args)

    @classmethod
    def needs_calibration(cls, args):
        return "data" if FORMATS[args.format].calibration else False

    @classmethod
    def describe(cls, args):
        return FORMATS[args.format](args).describe()

    @classmethod
    def weight_grid(cls, args):
        return args.format, getattr(args, "group_size", None)

    def validate(self, recipe, model, adapter, field):
        if recipe.export.decoder is not None and self.format.calibration:
            raise RecipeError(f"{self.format.describe()} calibrates activation scales on the prefill graph's inputs, "
                              "which the decode graph does not see; with export.decoder use a weight-only format "
                              "(fp16, int4, w8a16)", field=f"{field}.format")
        needed, target = self.format.opset, TARGETS[recipe.export.tensorrt.target]
        if needed > target.max_opset:
            able = ", ".join(t.name for t in TARGETS.values() if t.max_opset >= needed)
            raise RecipeError(f"{self.format.describe()} needs ONNX opset {needed}, above the {target.max_opset} that "
                              f"TensorRT {target.tensorrt} ({target.name}) parses; set export.tensorrt.target to one "
                              f"of: {able}", field=f"{field}.format")
        if isinstance(self.args, LayerArgs):
            chosen = self._targets(model, adapter, field)
            self.format.check_layers({n: m.in_features for n, m in chosen.items()}, field)
            divisor = self.format.width_divisor()
            if divisor is not None:
                check_widths_left(recipe, self.args, model, adapter, set(chosen), divisor[0],
                                  f"{self.format.describe()}", f"{field}.{divisor[1]}", divisor[2])

    def grid_layers(self, model, adapter, field):
        return set(self._targets(model, adapter, field)) if isinstance(self.args, LayerArgs) else set()

    @staticmethod
    def _candidates(model, adapter) -> dict:
        return {name: model.get_submodule(name) for b in adapter.blocks(model) for name in b.linears}

    def _targets(self, model, adapter, field: str) -> dict:
        return select(self._candidates(model, adapter), self.args.targets, self.args.ignore, field)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        work = folder / "work"
        work.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        details: dict = {"format": self.args.format}
        if isinstance(self.args, LayerArgs):
            candidates = self._candidates(ctx.model, ctx.adapter)
            chosen = self._targets(ctx.model, ctx.adapter, f"stages[{ctx.stage_index}]")
            details.update({"layers": len(chosen), "kept_float": sorted(set(candidates) - set(chosen))})
        bar = ctx.events.task(f"quantize {self.args.format}", total=len(ctx.onnx.graphs) + 1)
        # A decoder's prefill and decode graphs hold the same weights: the same rewrite of each keeps them equal.
        rewritten = []
        for _, path in ctx.onnx.graphs:
            bar.doing(f"rewriting {path.name}")
            rewritten.append(self._rewrite(ctx, path, folder, work))
            bar.advance()
        details.update(rewritten[0].details)
        details["seconds"] = round(time.perf_counter() - t0, 3)
        bar.doing("checker, parity, TensorRT readiness")
        result = self._check_and_place(ctx, folder, work, [r.model for r in rewritten], details)
        bar.advance()
        bar.done()
        shutil.rmtree(work)
        return result

    def _rewrite(self, ctx: RunContext, path: Path, folder: Path, work: Path) -> Rewritten:
        model = onnx.load(path)
        if any(n.op_type in qdq.QDQ_OPS for n in model.graph.node) or any(
                i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
            raise StageFailed(f"{path.name} already carries reduced precision (an interrupted run?); "
                              "rerun with --force", field=f"stages[{ctx.stage_index}]")
        nodes = self._nodes(ctx, model) if isinstance(self.args, LayerArgs) else {}
        scales = {node: ctx.weight_scales[n].numpy() for n, node in nodes.items() if n in ctx.weight_scales}
        context = FormatContext(path, folder, work, ctx.events,
                                self._samples(ctx) if self.format.calibration else [], scales)
        return self.format.apply(model, nodes, context)

    def _nodes(self, ctx: RunContext, model: onnx.ModelProto) -> dict[str, str]:
        """torch name -> ONNX node name for every targeted Linear; a target missing from the graph is an error."""
        chosen = self._targets(ctx.model, ctx.adapter, f"stages[{ctx.stage_index}]")
        found = linear_nodes(model)
        missing = [n for n in chosen if n not in found]
        if missing:
            raise StageFailed(f"{len(missing)} targeted layers have no MatMul/Gemm with a constant weight in the "
                              f"graph (e.g. {missing[0]})", field=f"stages[{ctx.stage_index}].targets")
        return {n: found[n].name for n in chosen}

    @staticmethod
    def _samples(ctx: RunContext) -> list[dict]:
        """Calibration samples at the export shapes, as ONNX Runtime feeds."""
        names = ctx.task_model().input_names
        samples = export_inputs(ctx, ctx.recipe.calibration.num_samples)
        return [{n: t.numpy() for n, t in zip(names, s)} for s in samples]

    def _stage_files(self, ctx: RunContext, work: Path, outs: list[onnx.ModelProto]) -> list[Path]:
        """The rewritten graphs under ``work``, written as they will ship (a decoder's two with one weight file)."""
        staged = [work / path.name for _, path in ctx.onnx.graphs]
        for out in outs:
            out.ir_version = onnx_export.IR_VERSION
        if len(outs) > 1:
            decoder.save_shared(outs, staged)
        else:
            large = onnx_export.file_bytes(ctx.onnx.path) > onnx_export.EXTERNAL_DATA_BYTES
            onnx_export.save(outs[0], staged[0], external=large)
        for path in staged:
            onnx.checker.check_model(str(path), full_check=True)
        return staged

    def _check_and_place(self, ctx: RunContext, folder: Path, work: Path, outs: list[onnx.ModelProto],
                         details: dict) -> StageResult:
        """The gate on staged copies; the graphs are replaced only if all pass, so a failed stage leaves
        the float graphs for --resume."""
        where = f"stages[{ctx.stage_index}]"
        # Raw logits are the wrong gate for quantized causal LMs: the task's own bounds replace them unless
        # the recipe sets rtol, which asks for the logits check at that tolerance (docs/methods/deployment.md §3).
        fidelity = bool(ctx.task.quantized_bounds) and self.args.rtol is None
        rtol = None if fidelity else self.format.tolerance
        staged = self._stage_files(ctx, work, outs)
        vlm_graphs = vlm_traced(ctx) if VISION in ctx.onnx.info else None
        if vlm_graphs is None:
            module = ctx.task_model()
            inputs = export_inputs(ctx)
            decode, steps = module, [module.step(i) for i in inputs] if len(outs) > 1 else []
        else:  # a VLM's prefill and decode graphs have their own modules (tasks/image_decoder.py)
            module, inputs = vlm_graphs[0].module, [vlm_graphs[0].example]
            decode, steps = vlm_graphs[1].module, [vlm_graphs[1].example]
        graphs = [GateGraph(MAIN, outs[0], staged[0], ctx.onnx.path, module, inputs, ctx.onnx.info, rtol, fidelity)]
        if len(outs) > 1:
            # The task's bounds need whole windows, and the decode graph takes one token: it is gated on
            # continuing its own prefill graph instead, and its parity with the float model is measured.
            details["continuation"] = decoder.check_continuation(staged[0], staged[1], module.input_names, inputs[0],
                                                                 self.format.tolerance, where)
            graphs.append(GateGraph(DECODE, outs[1], staged[1], ctx.onnx.graphs[1][1], decode, steps,
                                    ctx.onnx.info[DECODE], None))
        if vlm_graphs is not None:  # vision.onnx ships as exported; it joins the gate so build/ keeps all three
            vision = ctx.onnx.path.with_name(f"{VISION}.onnx")
            graphs.append(GateGraph(VISION, onnx.load(vision), vision, vision, vlm_graphs[2].module,
                                    [vlm_graphs[2].example], ctx.onnx.info[VISION], ctx.recipe.export.rtol))
        reports = gate(graphs, ctx.sparsity, ctx.recipe.export.tensorrt, folder, field=where, rtol_field=f"{where}.rtol",
                       target_field=where, log=lambda m: ctx.events.log(escape(m)))
        report, info = reports[0], ctx.onnx.info
        details.update({"checker": report.qdq.as_dict(), "parity": {**report.parity.as_dict(), "rtol": rtol},
                        "sparsity_check": report.sparsity})
        if report.fidelity is not None:
            details["fidelity"] = report.fidelity
        if len(reports) > 1:
            details["decode_parity"] = {**reports[1].parity.as_dict(), "rtol": None}
        for g, r in zip(graphs, reports):  # each graph's "parity" stays the float export's
            g.info.update(graph_record(g.model, g.final), tensorrt=r.tensorrt)
        info["quantization"] = details
        if self.format.ort_disabled_optimizers:
            ctx.onnx.disabled_optimizers = self.format.ort_disabled_optimizers
        ctx.onnx.save(folder / "onnx.json")
        return self._result(details, report, info)

    def _result(self, details: dict, report, info: dict) -> StageResult:
        rows = [[n["module"], n["op"], n["scheme"],
                 ", ".join(f"{k}: {v['dtype']} {v['granularity']}" for k, v in n["inputs"].items())]
                for n in report.qdq.nodes]
        metrics = {"format": self.args.format, "opset": info["opset"], "bytes": info["bytes"],
                   "quantized_ops": len(report.qdq.nodes), "parity": details["parity"],
                   "sparsity_check": report.sparsity, "tensorrt": tensorrt_headline(report.tensorrt)}
        tables = [Table("Precision", ["key", "value"], [[k, v] for k, v in details.items()
                                                        if k not in ("checker", "parity", "fidelity")]),
                  Table("Quantized ops (Q/DQ placement)", ["module", "op", "scheme", "inputs"], rows),
                  parity_table("Parity with the float PyTorch model (ONNX Runtime, CPU)", details["parity"])]
        if report.fidelity is not None:
            metrics["fidelity"] = {k: v for k, v in report.fidelity.items() if k != "bounds"}
            tables.append(Table("Fidelity to the float PyTorch model (parity batches)", ["metric", "value", "bound"],
                                [[k, v, report.fidelity["bounds"].get(k, "")] for k, v in report.fidelity.items()
                                 if k != "bounds"]))
        return StageResult(metrics, [*tables, tensorrt_table(report.tensorrt)])

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.onnx = OnnxArtifact.load(ctx.onnx.path, folder / "onnx.json")
