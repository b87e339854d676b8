"""Export stage: model.onnx at the recipe's static shapes, checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

import onnx
from rich.markup import escape

from calibration.batches import calibration_batches
from export import inspect as onnx_inspect
from export import onnx as onnx_export
from export import tensorrt, trt_build
from pipeline.context import RunContext
from pipeline.errors import StageFailed
from tokens import graph as token_graph

from .base import Stage, StageArgs, StageResult, Table


class ExportArgs(StageArgs):
    type: Literal["export"]


def parity_inputs(ctx: RunContext, num_samples: int | None = None) -> list[tuple]:
    """Calibration-source samples at the export shapes: what the parity check feeds both runtimes
    (and graph-level calibration, with ``num_samples``)."""
    ex = ctx.recipe.export
    spec = ctx.recipe.calibration.model_copy(update={
        "num_samples": num_samples or ex.batch_size * ex.parity_batches, "seq_len": ex.seq_len,
        "batch_size": ex.batch_size})
    batches = calibration_batches(ctx.recipe.model.task, ctx.preprocessor, spec, image_size=ex.image_size)
    module = ctx.task_model()
    return [module.example(b.inputs) for b in batches if b.size == ex.batch_size]


class Export(Stage):
    type = "export"
    Args = ExportArgs

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        ex = ctx.recipe.export
        module = ctx.task_model()
        inputs = parity_inputs(ctx)
        path = ctx.workdir / "model.onnx"
        t0 = time.perf_counter()
        model = onnx_export.export(module, inputs[0], path, module.input_names, module.output_names, ex.opset)
        seconds_export = time.perf_counter() - t0
        par = onnx_export.parity(path, module, module.input_names, inputs)
        sparsity = self.check_sparsity(ctx, model)
        ctx.onnx_path = path
        ctx.onnx = {"path": path.name, "opset": ex.opset, "ir_version": model.ir_version,
                    "exporter": "torch.onnx dynamo", **onnx_export.io_spec(model),
                    "parity": {**par.as_dict(), "rtol": ex.rtol}, "sparsity_check": sparsity,
                    "nodes": len(model.graph.node), "ops": sorted({n.op_type for n in model.graph.node}),
                    "bytes": onnx_export.file_bytes(path)}
        if module.tokens is not None:
            ctx.onnx["token_pruning"] = token_graph.check_export(module.tokens, model, path, module, inputs, ex.opset,
                                                                 ex.rtol)
        metrics = {"seconds_export": round(seconds_export, 3), "parity": ctx.onnx["parity"],
                   "sparsity_check": sparsity, "bytes": ctx.onnx["bytes"]}
        if par.max_rel_err > ex.rtol:
            raise StageFailed(f"ONNX Runtime output differs from PyTorch: max relative error {par.max_rel_err:.3g} "
                              f"> export.rtol {ex.rtol:g} (max abs {par.max_abs_err:.3g})", field="export")
        readiness = tensorrt_readiness(ctx, model, folder, "export.tensorrt.target")
        ctx.onnx["tensorrt"] = tensorrt_material(ctx, readiness, path, dict(zip(module.input_names, inputs[0])))
        (folder / "onnx.json").write_text(json.dumps(ctx.onnx, indent=1))
        metrics["tensorrt"] = trt_headline(ctx.onnx["tensorrt"])
        io_rows = [[d["name"], "input" if d in ctx.onnx["inputs"] else "output", d["dtype"], str(d["shape"])]
                   for d in ctx.onnx["inputs"] + ctx.onnx["outputs"]]
        return StageResult(metrics, [Table("ONNX graph", ["tensor", "kind", "dtype", "static shape"], io_rows),
                                     Table("Parity with PyTorch (ONNX Runtime, CPU)",
                                           ["samples", "max abs err", "max rel err", "rtol"],
                                           [[par.samples, f"{par.max_abs_err:.3g}", f"{par.max_rel_err:.3g}",
                                             f"{ex.rtol:g}"]]),
                                     trt_table(ctx.onnx["tensorrt"])])

    @staticmethod
    def check_sparsity(ctx: RunContext, model: onnx.ModelProto, field: str = "export") -> dict:
        """Pruned zeros must be in the exported initializers (dequantized ones too), N:M groups along K."""
        if not ctx.sparsity:
            return {"layers": 0}
        weights = onnx_inspect.linear_weights(model)
        bad = []
        for name, info in ctx.sparsity.items():
            w = weights.get(name)
            if w is None:
                bad.append(f"{name}: not found in the graph")
                continue
            zeros = float((w == 0).mean())
            if zeros + 1e-9 < info["sparsity"]:
                bad.append(f"{name}: {zeros:.4f} zeros exported, {info['sparsity']:.4f} in PyTorch")
            if ":" in info["pattern"]:
                n, m = map(int, info["pattern"].split(":"))
                v = onnx_inspect.nm_violations(w, n, m)
                if v:
                    bad.append(f"{name}: {v} groups of {m} along K with more than {n} non-zeros")
        if bad:
            raise StageFailed(f"sparsity lost in the graph: {'; '.join(bad[:3])}", field=field)
        patterns = sorted({i["pattern"] for i in ctx.sparsity.values()})
        return {"layers": len(ctx.sparsity), "patterns": patterns, "ok": True}

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.onnx_path = ctx.workdir / "model.onnx"
        ctx.onnx = json.loads((folder / "onnx.json").read_text())


def tensorrt_readiness(ctx: RunContext, model: onnx.ModelProto, folder: Path, field: str) -> tensorrt.Readiness:
    """Readiness of ``model`` for the recipe's TensorRT target, saved in the stage folder; a graph
    that is not ready fails the stage (export, and quantize on its rewritten graph)."""
    readiness = tensorrt.check(model, ctx.recipe.export.tensorrt.target)
    (folder / "tensorrt.json").write_text(json.dumps(readiness.as_dict(), indent=1))
    if not readiness.ok:
        t = readiness.target
        raise StageFailed(f"the graph is not ready for TensorRT {t.tensorrt} ({t.name}): {readiness.summary()}",
                          field=field)
    return readiness


def tensorrt_material(ctx: RunContext, readiness: tensorrt.Readiness, path: Path, example: dict) -> dict:
    """build/ for the graph at ``path`` (spec with its sha256, build_engine.sh, golden data), and an
    engine when this machine can build one."""
    spec = ctx.recipe.export.tensorrt
    build_dir = ctx.workdir / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    build = trt_build.build_spec(readiness.target, path, build_dir, ctx.onnx, readiness,
                                 spec.workspace_mib, spec.optimization_level, spec.atol, spec.rtol)
    feeds = [{name: t.numpy() for name, t in example.items()}]
    trt_build.write_material(build_dir, build, feeds)
    engine = trt_build.build_here(build_dir, build, feeds)
    if engine["built"]:
        ctx.events.log(f"built {engine['engine']} ({engine['gpu']}); ONNX Runtime comparison "
                       f"{'passed' if engine['comparison']['passed'] else 'FAILED'}")
    else:
        ctx.events.log(f"no TensorRT engine built here: {escape(engine['reason'])}; build it on the device with "
                       "build/build_engine.sh")
    return {**readiness.as_dict(), "build": {"spec": "build/build_spec.json", "script": "build/build_engine.sh",
                                             "engine": engine}}


def trt_headline(trt: dict) -> dict:
    engine = trt["build"]["engine"]
    return {"target": trt["target"], "ready": trt["ok"], "sparse_2_4_layers": trt["sparse_2_4_layers"],
            "engine": engine["engine"] if engine["built"] else "not built here"}


def trt_table(trt: dict) -> Table:
    engine = trt["build"]["engine"]
    rows = [[check, result] for check, result in trt["checks"].items()]
    rows += [["warning", str(w["message"])] for w in trt["warnings"]]
    rows.append(["2:4 sparse MatMul/Gemm weights", f"{trt['sparse_2_4_layers']} of {len(trt['sparsity'])}"])
    rows.append(["engine", f"{engine['engine']} ({engine['gpu']}, TensorRT {engine['tensorrt']})" if engine["built"]
                 else f"not built here: {engine['reason']}. On the device run build/build_engine.sh"])
    return Table(f"TensorRT readiness: {trt['target']} (TensorRT {trt['tensorrt']}, {trt['platform']})",
                 ["check", "result"], rows)
