"""The one gate every graph passes after it changes (export, then each precision rewrite).

In order, on a staged file: ONNX Runtime parity with the PyTorch task model (for a quantized graph
of a task with ``quantized_bounds``, such as causal LMs, the task's fidelity metrics against the
float model instead of raw logits: docs/methods/deployment.md §3), pruned zeros (and
N:M groups along K) still in the initializers, the Q/DQ layout TensorRT fuses, TensorRT readiness
for the recipe's target. Only when all pass is the staged file moved into place, and ``build/``
(spec with the graph's sha256, build_engine.sh, golden data) is written for the file that ships.
A failure raises StageFailed and leaves the graph that was there before.
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
    tensorrt: dict  # readiness, build material and engine (manifest "tensorrt")
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


def check_sparsity(model: onnx.ModelProto, sparsity: Mapping[str, LayerSparsity], field: str) -> dict:
    """Pruned zeros must be in the exported initializers (dequantized ones too), N:M groups along K."""
    if not sparsity:
        return {"layers": 0}
    weights = onnx_inspect.linear_weights(model)
    bad = []
    for name, info in sparsity.items():
        w = weights.get(name)
        if w is None:
            bad.append(f"{name}: not found in the graph")
            continue
        zeros = float((w == 0).mean())
        if zeros + 1e-9 < info.sparsity:
            bad.append(f"{name}: {zeros:.4f} zeros exported, {info.sparsity:.4f} in PyTorch")
        if ":" in info.pattern:
            n, m = map(int, info.pattern.split(":"))
            v = onnx_inspect.nm_violations(w, n, m)
            if v:
                bad.append(f"{name}: {v} groups of {m} along K with more than {n} non-zeros")
    if bad:
        raise StageFailed(f"sparsity lost in the graph: {'; '.join(bad[:3])}", field=field)
    return {"layers": len(sparsity), "patterns": sorted({i.pattern for i in sparsity.values()}), "ok": True}


def gate(model: onnx.ModelProto, staged: Path, final: Path, module: torch.nn.Module, inputs: list[tuple],
         rtol: float | None, sparsity: Mapping[str, LayerSparsity], spec: TensorRTSpec, folder: Path, info: dict,
         field: str, rtol_field: str, target_field: str, log: Callable[[str], None],
         quantized: bool = False) -> GateReport:
    """Check ``model`` (saved at ``staged``), then place it at ``final`` and write ``build/`` beside it.

    ``field``, ``rtol_field`` and ``target_field`` name the recipe fields a failure points at.
    ``info`` is the graph's manifest record (inputs/outputs) for build_spec.json; the TensorRT
    readiness report is saved as ``folder/tensorrt.json`` either way. ``quantized``: a task with
    ``quantized_bounds`` is gated on them; ``rtol`` None: the logits parity is measured, not gated.
    """
    names = module.input_names
    task = module.task
    rows: list | None = [] if quantized and task.quantized_bounds else None
    par = onnx_export.parity(staged, module, names, inputs, keep=rows)
    if rtol is not None and par.max_rel_err > rtol:
        raise StageFailed(f"ONNX Runtime output differs from the PyTorch model: max relative error "
                          f"{par.max_rel_err:.3g} > {rtol:g} (max abs {par.max_abs_err:.3g})", field=rtol_field)
    fidelity = check_fidelity(task, rows, field) if rows is not None else None
    kept = check_sparsity(model, sparsity, field)
    layout = qdq.inspect_qdq(model)
    (folder / "qdq.json").write_text(json.dumps({"nodes": layout.nodes, "problems": layout.problems}, indent=1))
    if layout.problems:
        raise StageFailed(f"Q/DQ layout TensorRT would not fuse ({len(layout.problems)} problems): "
                          f"{layout.problems[0]}", field=field)
    readiness = tensorrt.check(model, spec.target)
    (folder / "tensorrt.json").write_text(json.dumps(readiness.as_dict(), indent=1))
    if not readiness.ok:
        t = readiness.target
        raise StageFailed(f"the graph is not ready for TensorRT {t.tensorrt} ({t.name}): {readiness.summary()}",
                          field=target_field)
    if staged != final:
        data = staged.with_name(f"{staged.name}.data")
        if data.exists():
            data.replace(final.with_name(f"{final.name}.data"))
        staged.replace(final)
    example = {n: t.numpy() for n, t in zip(names, inputs[0])}
    trt = _material(readiness, final, info, spec, example, log)
    return GateReport(par, kept, layout, trt, fidelity)


def _material(readiness: tensorrt.Readiness, path: Path, info: dict, spec: TensorRTSpec, example: dict,
              log: Callable[[str], None]) -> dict:
    """build/ next to the graph at ``path``, and an engine when this machine can build one."""
    build_dir = path.parent / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    build = trt_build.build_spec(readiness.target, path, build_dir, info, readiness,
                                 spec.workspace_mib, spec.optimization_level, spec.atol, spec.rtol)
    trt_build.write_material(build_dir, build, [example])
    engine = trt_build.build_here(build_dir, build, [example])
    if engine["built"]:
        log(f"built {engine['engine']} ({engine['gpu']}); ONNX Runtime comparison "
            f"{'passed' if engine['comparison']['passed'] else 'FAILED'}")
    else:
        log(f"no TensorRT engine built here: {engine['reason']}; build it on the device with build/build_engine.sh")
    return {**readiness.as_dict(), "build": {"spec": "build/build_spec.json", "script": "build/build_engine.sh",
                                             "engine": engine}}
