"""Export stage: model.onnx at the recipe's static shapes, through the one gate (export/gate.py).

With ``export.decoder`` (causal LMs) model.onnx is the prefill graph and decode.onnx the one-token
decode graph over the same static KV cache and weight file (export/decoder.py), and the generation
config goes to generation/ for ``pipeline generate``. Every export writes the model's tokenizer (with
its chat template) or image processor config to preprocessor/, so that a pulled artifact can prepare
its graph's inputs on its own.

The model is on the CPU here whatever the run's device (``cpu_only``, RunContext.to_cpu): the dynamo
exporter bakes the device of every traced constant into the graph, and a CPU trace gives the same
file from a GPU run as from a CPU run; the parity check then compares ONNX Runtime with PyTorch on
the CPU too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from rich.markup import escape

from core.errors import RecipeError
from export import decoder, offloaded, token_graph, vlm
from export import onnx as onnx_export
from export.artifact import GENERATION, PREPROCESSOR
from export.gate import MAIN, GateGraph, gate
from models.adapters import pretrained
from tasks import TASKS
from tasks.decoder import check_decoder, is_cache
from tasks.image_decoder import VISION

from .base import (
    Stage,
    StageArgs,
    StageResult,
    Table,
    check_positions,
    export_inputs,
    graph_record,
    parity_table,
    tensorrt_headline,
    tensorrt_table,
    vlm_traced,
)
from .context import OnnxArtifact, RunContext


class ExportArgs(StageArgs):
    type: Literal["export"]


class Export(Stage):
    type = "export"
    Args = ExportArgs
    cpu_only = True
    offloads = True  # the one task graph, weights streamed block by block (export/offloaded.py)
    settings = ("export",)

    def validate(self, recipe, model, adapter, field):
        check_positions(recipe, model, recipe.export.seq_len, "export.seq_len")
        if recipe.model.offload and recipe.export.decoder is not None:
            raise RecipeError("an offloaded model exports its one task graph, not prefill and decode graphs: remove "
                              "export.decoder, or set model.offload: false", field="export.decoder")
        if recipe.export.decoder is not None:
            check_decoder(model, adapter, recipe.model.task, recipe.export.decoder.max_len, "export.decoder")
            if TASKS[recipe.model.task].reads_pruned_tokens and any(a.type == "evaluate" for a in recipe.stages):
                raise RecipeError("an image-text-to-text run with export.decoder has no 'evaluate' stage yet: its "
                                  "three graphs are scored by `python -m pipeline generate` (remove evaluate, or drop "
                                  "export.decoder for the one-graph logits export)", field="export.decoder")

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        ex = ctx.recipe.export
        module = ctx.task_model()
        path = ctx.workdir / "model.onnx"
        t0 = time.perf_counter()
        bar = ctx.events.task("export", total=2)  # two long, opaque steps: the bar shows which and for how long
        bar.doing("torch.onnx dynamo trace" + (" (prefill and decode graphs)" if ex.decoder else ""))
        vlm_graphs = None
        if ex.decoder is not None and ctx.task.reads_pruned_tokens:
            vlm_graphs = vlm.export(vlm_traced(ctx), ctx.workdir, ex.opset)
        # a VLM's prefill window holds the K image tokens it reads, not the N placeholders the task's batches carry
        inputs = [] if vlm_graphs is not None else export_inputs(ctx)
        if vlm_graphs is not None:
            protos, examples = [g.proto for g in vlm_graphs], [[g.example] for g in vlm_graphs]
            pretrained(ctx.model).generation_config.save_pretrained(ctx.workdir / GENERATION)
        elif ctx.offload is not None:  # validate() leaves only the one task graph
            protos = [offloaded.export(module, ctx.offload, inputs[0], path, ex.opset)]
            examples = [inputs]
        elif ex.decoder is None:
            protos = [onnx_export.export(module, inputs[0], path, module.input_names, module.output_names, ex.opset)]
            examples = [inputs]
        else:
            steps = [module.step(i) for i in inputs]
            protos = list(decoder.export(module, inputs[0], steps[0], path, ex.opset))
            examples = [inputs, steps]
            pretrained(ctx.model).generation_config.save_pretrained(ctx.workdir / GENERATION)
        seconds_export = time.perf_counter() - t0
        ctx.preprocessor.save_pretrained(ctx.workdir / PREPROCESSOR)
        names = [MAIN, decoder.DECODE, VISION][:len(protos)]
        paths = [path, path.with_name(f"{decoder.DECODE}.onnx"), path.with_name(f"{VISION}.onnx")]
        # PyTorch's side of the parity check: an offloaded model's runs one block in memory at a time
        reference = offloaded.Streamed(module, ctx.offload) if ctx.offload is not None else module
        modules = [g.module for g in vlm_graphs] if vlm_graphs is not None else [reference] * len(protos)
        graphs = [GateGraph(name, proto, p, p, m, exs, {**graph_record(proto, p), "exporter": "torch.onnx dynamo"},
                            ex.rtol) for name, proto, p, m, exs in zip(names, protos, paths, modules, examples)]
        bar.advance()
        bar.doing("parity with PyTorch, TensorRT readiness")
        reports = gate(graphs, ctx.sparsity, ex.tensorrt, folder, field="export", rtol_field="export.rtol",
                       target_field="export.tensorrt.target", log=lambda m: ctx.events.log(escape(m)))
        bar.advance()
        bar.done()
        for g, r in zip(graphs, reports):
            g.info.update(parity={**r.parity.as_dict(), "rtol": ex.rtol}, sparsity_check=r.sparsity, tensorrt=r.tensorrt)
        info = graphs[0].info
        info["preprocessor"] = PREPROCESSOR
        if ex.decoder is not None:
            info[decoder.DECODE] = graphs[1].info
            info["decoder"] = {"prefill_len": ex.seq_len, "max_len": ex.decoder.max_len,
                               "weights": f"{path.name}.data", "generation": GENERATION}
        if vlm_graphs is not None:
            info[VISION] = graphs[2].info
        if module.tokens is not None:  # the selector sits in the vision graph when there is one
            info["token_pruning"] = token_graph.check_export(module.tokens, protos[-1], path, module, inputs, ex.opset,
                                                             ex.rtol)
        ctx.onnx = OnnxArtifact(path, info)
        ctx.onnx.save(folder / "onnx.json")
        metrics = {"seconds_export": round(seconds_export, 3), "parity": info["parity"],
                   "sparsity_check": info["sparsity_check"], "bytes": info["bytes"],
                   "tensorrt": tensorrt_headline(info["tensorrt"])}
        if ex.decoder is not None:
            metrics["decode_parity"] = graphs[1].info["parity"]
        io_rows = [row for g in graphs for kind in ("input", "output") for row in _io_rows(g.final.name, kind,
                                                                                           g.info[f"{kind}s"])]
        return StageResult(metrics, [Table("ONNX graphs", ["graph", "tensor", "kind", "dtype", "static shape"], io_rows),
                                     *(parity_table(f"{g.final.name}: parity with PyTorch (ONNX Runtime, CPU)",
                                                    g.info["parity"]) for g in graphs),
                                     tensorrt_table(info["tensorrt"])])

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        ctx.onnx = OnnxArtifact.load(ctx.workdir / "model.onnx", folder / "onnx.json")


def _io_rows(graph: str, kind: str, tensors: list[dict]) -> list[list]:
    """One row per tensor; a decoder's per-layer cache tensors in one row per distinct shape."""
    rows = [[graph, d["name"], kind, d["dtype"], str(d["shape"])] for d in tensors if not is_cache(d["name"])]
    cache: dict[tuple, list[str]] = {}
    for d in tensors:
        if is_cache(d["name"]):
            cache.setdefault((d["dtype"], str(d["shape"])), []).append(d["name"])
    rows += [[graph, f"{names[0]} … {names[-1]} ({len(names)})", kind, dtype, shape]
             for (dtype, shape), names in cache.items()]
    return rows

