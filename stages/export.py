"""Export stage: model.onnx at the recipe's static shapes, through the one gate (export/gate.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from rich.markup import escape

from export import onnx as onnx_export
from export import token_graph
from export.gate import gate

from .base import (
    Stage,
    StageArgs,
    StageResult,
    Table,
    check_positions,
    export_inputs,
    parity_table,
    tensorrt_headline,
    tensorrt_table,
)
from .context import OnnxArtifact, RunContext


class ExportArgs(StageArgs):
    type: Literal["export"]


class Export(Stage):
    type = "export"
    Args = ExportArgs
    settings = ("export",)

    def validate(self, recipe, model, adapter, field):
        check_positions(recipe, model, recipe.export.seq_len, "export.seq_len")

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        ex = ctx.recipe.export
        module = ctx.task_model()
        inputs = export_inputs(ctx)
        path = ctx.workdir / "model.onnx"
        t0 = time.perf_counter()
        model = onnx_export.export(module, inputs[0], path, module.input_names, module.output_names, ex.opset)
        seconds_export = time.perf_counter() - t0
        info = {"path": path.name, "opset": ex.opset, "ir_version": model.ir_version, "exporter": "torch.onnx dynamo",
                **onnx_export.io_spec(model), "nodes": len(model.graph.node),
                "ops": sorted({n.op_type for n in model.graph.node}), "bytes": onnx_export.file_bytes(path)}
        report = gate(model, path, path, module, inputs, ex.rtol, ctx.sparsity, ex.tensorrt, folder, info,
                      field="export", rtol_field="export.rtol",
                      target_field="export.tensorrt.target", log=lambda m: ctx.events.log(escape(m)))
        info.update({"parity": {**report.parity.as_dict(), "rtol": ex.rtol}, "sparsity_check": report.sparsity,
                     "tensorrt": report.tensorrt})
        if module.tokens is not None:
            info["token_pruning"] = token_graph.check_export(module.tokens, model, path, module, inputs, ex.opset,
                                                             ex.rtol)
        ctx.onnx = OnnxArtifact(path, info)
        ctx.onnx.save(folder / "onnx.json")
        metrics = {"seconds_export": round(seconds_export, 3), "parity": info["parity"],
                   "sparsity_check": report.sparsity, "bytes": info["bytes"],
                   "tensorrt": tensorrt_headline(report.tensorrt)}
        io_rows = [[d["name"], "input" if d in info["inputs"] else "output", d["dtype"], str(d["shape"])]
                   for d in info["inputs"] + info["outputs"]]
        return StageResult(metrics, [Table("ONNX graph", ["tensor", "kind", "dtype", "static shape"], io_rows),
                                     parity_table("Parity with PyTorch (ONNX Runtime, CPU)", info["parity"]),
                                     tensorrt_table(report.tensorrt)])

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.onnx = OnnxArtifact.load(ctx.workdir / "model.onnx", folder / "onnx.json")
