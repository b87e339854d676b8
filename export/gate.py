"""The one gate every graph passes after it changes (export, then each precision rewrite).

In order, on a staged file: ONNX Runtime parity with the PyTorch task model (for a quantized graph
of a task with ``quantized_bounds``, such as causal LMs, the task's fidelity metrics against the
float model instead of raw logits: docs/methods/deployment.md §3), pruned zeros (and
N:M groups along K) still in the initializers, the Q/DQ layout TensorRT fuses, TensorRT readiness
for the recipe's target. A run ships one graph, or two for a decoder (prefill and decode, one weight
file); only when every graph passes are the staged files moved into place, and ``build/`` (spec
with each graph's sha256, build_engine.sh building every engine, golden data per graph) is written
for the files that ship. A failure raises StageFailed and leaves the graphs that were there before.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from core.errors import StageFailed
from tasks import Task

from . import inspect as onnx_inspect
from . import onnx as onnx_export
from . import qdq, tensorrt, trt_build
from .spec import TensorRTSpec


@dataclass(frozen=True)
class LayerSparsity:
    """What weight pruning left in one Linear, which the exported graph must keep."""

    pattern: str  # "unstructured" or "N:M"
    sparsity: float  # fraction of zeros


@dataclass
class GateReport:
    parity: onnx_export.Parity
    sparsity: dict
    qdq: qdq.QdqReport
    tensorrt: dict  # readiness (manifest "tensorrt"); for the first graph also build material and engines
    fidelity: dict | None = None  # the task's metrics gating a quantized graph, with their bounds


def check_fidelity(task: Task, rows: list, field: str) -> dict:
    """The task's quantized-graph metrics (per batch: inputs, float outputs, quantized outputs) within
    its ``quantized_bounds``; raises StageFailed naming every metric out of bounds."""
    metrics = task.quantized_fidelity(rows)
    missed = [f"{k} {metrics[k]:g} {'>' if kind == 'max' else '<'} {bound:g}"
              for k, (kind, bound) in task.quantized_bounds.items()
              if (metrics[k] > bound if kind == "max" else metrics[k] < bound)]
    if missed:
        raise StageFailed(f"the quantized graph strays from the float model on the parity batches: "
                          f"{'; '.join(missed)}", field=field)
    return {**metrics, "bounds": {k: f"{kind} {bound:g}" for k, (kind, bound) in task.quantized_bounds.items()}}


def check_sparsity(model: onnx.ModelProto, sparsity: Mapping[str, LayerSparsity], field: str,
                   base_dir: Path | None = None) -> dict:
    """Pruned zeros must be in the exported initializers (dequantized ones too), N:M groups along K;
    the weights are read one at a time (``base_dir``: the graph's folder, for external data)."""
    if not sparsity:
        return {"layers": 0}
    bad, found = [], set()
    for node, w in onnx_inspect.matmul_weights(model, base_dir):
        name = onnx_inspect.torch_scope(node)
        info = sparsity.get(name) if name else None
        if info is None:
            continue
        found.add(name)
        zeros = float((w == 0).mean())
        if zeros + 1e-9 < info.sparsity:
            bad.append(f"{name}: {zeros:.4f} zeros exported, {info.sparsity:.4f} in PyTorch")
        if ":" in info.pattern:
            n, m = map(int, info.pattern.split(":"))
            v = onnx_inspect.nm_violations(w, n, m)
            if v:
                bad.append(f"{name}: {v} groups of {m} along K with more than {n} non-zeros")
    bad = [f"{name}: not found in the graph" for name in sparsity if name not in found] + bad
    if bad:
        raise StageFailed(f"sparsity lost in the graph: {'; '.join(bad[:3])}", field=field)
    return {"layers": len(sparsity), "patterns": sorted({i.pattern for i in sparsity.values()}), "ok": True}


@dataclass
class GateGraph:
    """One graph through the gate: the proto, where it is staged and where it ships, and the PyTorch
    module (positional inputs in ``module.input_names`` order) and inputs it must agree with."""

    name: str  # "model" (the task graph, or the prefill graph of a decoder) or "decode": its engine's name
    model: onnx.ModelProto
    staged: Path
    final: Path
    module: torch.nn.Module
    inputs: list[tuple]
    info: dict  # the graph's manifest record (inputs/outputs) for build_spec.json
    rtol: float | None  # None: the output parity is measured, not gated
    quantized: bool = False  # a task with ``quantized_bounds`` is gated on them instead

    def record(self, folder: Path, kind: str) -> Path:
        """Where this graph's ``kind`` report (qdq, tensorrt) goes in the stage folder."""
        return folder / (f"{kind}.json" if self.name == MAIN else f"{self.name}.{kind}.json")


MAIN = "model"


def check(g: GateGraph, sparsity: Mapping[str, LayerSparsity], spec: TensorRTSpec, folder: Path, field: str,
          rtol_field: str, target_field: str) -> tuple[GateReport, tensorrt.Readiness]:
    """Every check on one staged graph; raises StageFailed on the first that fails."""
    task = g.module.task
    rows: list | None = [] if g.quantized and task.quantized_bounds else None
    par = onnx_export.parity(g.staged, g.module, g.module.input_names, g.inputs, keep=rows)
    if g.rtol is not None and par.max_rel_err > g.rtol:
        raise StageFailed(f"{_which(g)}ONNX Runtime output differs from the PyTorch model: max relative error "
                          f"{par.max_rel_err:.3g} > {g.rtol:g} (max abs {par.max_abs_err:.3g})", field=rtol_field)
    fidelity = check_fidelity(task, rows, field) if rows is not None else None
    kept = check_sparsity(g.model, sparsity, field, g.staged.parent)
    layout = qdq.inspect_qdq(g.model)
    g.record(folder, "qdq").write_text(json.dumps({"nodes": layout.nodes, "problems": layout.problems}, indent=1))
    if layout.problems:
        raise StageFailed(f"{_which(g)}Q/DQ layout TensorRT would not fuse ({len(layout.problems)} problems): "
                          f"{layout.problems[0]}", field=field)
    readiness = tensorrt.check(g.model, spec.target, g.staged.parent)
    g.record(folder, "tensorrt").write_text(json.dumps(readiness.as_dict(), indent=1))
    if not readiness.ok:
        t = readiness.target
        raise StageFailed(f"{_which(g)}the graph is not ready for TensorRT {t.tensorrt} ({t.name}): "
                          f"{readiness.summary()}", field=target_field)
    return GateReport(par, kept, layout, readiness.as_dict(), fidelity), readiness


def _which(g: GateGraph) -> str:
    return "" if g.name == MAIN else f"{g.final.name}: "


def gate(graphs: list[GateGraph], sparsity: Mapping[str, LayerSparsity], spec: TensorRTSpec, folder: Path,
         field: str, rtol_field: str, target_field: str, log: Callable[[str], None]) -> list[GateReport]:
    """Check every graph (each saved at its ``staged`` path), then place them all at their ``final``
    paths and write ``build/`` beside them for all of them.

    ``field``, ``rtol_field`` and ``target_field`` name the recipe fields a failure points at. Each
    graph's Q/DQ and TensorRT reports are saved in ``folder`` either way. Nothing is placed unless
    every graph passes, so graphs that share a weight file never ship half rewritten.
    """
    checked = [check(g, sparsity, spec, folder, field, rtol_field, target_field) for g in graphs]
    for g in graphs:
        if g.staged != g.final:
            data = g.staged.with_name(f"{g.staged.name}.data")
            if data.exists():
                data.replace(g.final.with_name(f"{g.final.name}.data"))
            g.staged.replace(g.final)
    reports = [report for report, _ in checked]
    reports[0].tensorrt = _material(graphs, checked[0][1], spec, log)
    return reports


def _material(graphs: list[GateGraph], readiness: tensorrt.Readiness, spec: TensorRTSpec,
              log: Callable[[str], None]) -> dict:
    """build/ next to the graphs, and engines when this machine can build them; the first graph's
    readiness record (which stands for all: same weights) with what was written."""
    build_dir = graphs[0].final.parent / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    build = trt_build.build_spec(readiness.target, [(g.name, g.final, g.info) for g in graphs], build_dir,
                                 readiness, spec.workspace_mib, spec.optimization_level, spec.atol, spec.rtol)
    feeds = {g.name: [{n: t.numpy() for n, t in zip(g.module.input_names, g.inputs[0])}] for g in graphs}
    trt_build.write_material(build_dir, build, feeds)
    engine = trt_build.build_here(build_dir, build, feeds)
    if engine["built"]:
        passed = all(e["comparison"]["passed"] for e in engine["engines"])
        log(f"built {', '.join(e['engine'] for e in engine['engines'])} ({engine['gpu']}); ONNX Runtime comparison "
            f"{'passed' if passed else 'FAILED'}")
    else:
        log(f"no TensorRT engine built here: {engine['reason']}; build it on the device with build/build_engine.sh")
    return {**readiness.as_dict(), "build": {"spec": "build/build_spec.json", "script": "build/build_engine.sh",
                                             "engine": engine}}
