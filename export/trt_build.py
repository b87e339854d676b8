"""Build material for TensorRT engines: the spec, the on-device script, golden data, and (with
the ``[tensorrt]`` extra and a GPU) the engines themselves.

An engine runs only with the TensorRT version and GPU architecture it was built with, so the
portable artifact is the ONNX plus these exact settings, and engines are built on the device.
A run has one engine per graph (``model.plan``; a decoder also ``decode.plan``), built with the
same flags and one timing cache under ``build/engines/<key>/`` with ``key = trt<version>-sm<compute
capability>``, next to ``engine.json`` recording what they were built with and each plan's sha256;
a build never writes into another key.

The script drives ``trtexec`` (JetPack ships it; the JetPack 6 Python bindings are 3.10-only, so
the device needs nothing of this project's stack). Flag names follow trtexec so that a build can
be reproduced by hand from ``build_spec.json``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import shutil
import string
from importlib import resources
from pathlib import Path

import numpy as np

from core.files import dump, now, sha256_path, write_atomic

from .onnx import external_files
from .tensorrt import Readiness
from .trt_targets import Target

SPEC_SCHEMA = "edgeprune-trt-build/2"
TIMING_CACHE = "timing.cache"
GOLDEN_INPUTS = "golden/inputs.json"  # the first graph's; another graph's sit in golden/<name>/
GOLDEN_OUTPUTS = "golden/onnxrt_outputs.json"


def engine_key(tensorrt_version: str, compute_capability: str) -> str:
    """``trt10.3.0-sm87``: the two things an engine cannot be moved across."""
    return f"trt{tensorrt_version}-sm{compute_capability.replace('.', '')}"


def golden(name: str, first: bool) -> dict:
    """Where a graph's golden inputs and ONNX Runtime outputs go, relative to build/."""
    if first:
        return {"inputs": GOLDEN_INPUTS, "outputs": GOLDEN_OUTPUTS}
    return {"inputs": f"golden/{name}/inputs.json", "outputs": f"golden/{name}/onnxrt_outputs.json"}


def build_spec(target: Target, graphs: list[tuple[str, Path, dict]], build_dir: Path, readiness: Readiness,
               workspace_mib: int, optimization_level: int, atol: float, rtol: float) -> dict:
    """One spec for every graph of the run (name, ONNX path, its inputs/outputs): one engine each, built
    with the same flags and one timing cache. The graphs hold the same weights, so the first graph's
    ``readiness`` (weight types, 2:4 layers) stands for all."""
    strongly_typed = target.major_minor >= (10, 0)  # --stronglyTyped exists from TensorRT 9/10
    return {
        "schema": SPEC_SCHEMA,
        "target": target.name, "tensorrt": target.tensorrt, "platform": target.platform,
        "compute_capability": target.compute_capability,
        "graphs": [_graph(name, path, io, build_dir, i == 0) for i, (name, path, io) in enumerate(graphs)],
        "strongly_typed": strongly_typed,
        "precision_flags": [] if strongly_typed else _weak_precision_flags(readiness),
        "sparsity": readiness.sparse_layers > 0, "sparse_layers": readiness.sparse_layers,
        "workspace_mib": workspace_mib, "builder_optimization_level": optimization_level,
        "timing_cache": f"engines/{{key}}/{TIMING_CACHE}",
        "key": engine_key("<tensorrt version>", "<compute capability>"),
        "tolerance": {"atol": atol, "rtol": rtol},
    }


def _graph(name: str, onnx_path: Path, io: dict, build_dir: Path, first: bool) -> dict:
    data = external_files(onnx_path)
    return {"name": name,
            "onnx": {"path": os.path.relpath(onnx_path, build_dir), "sha256": sha256_path(onnx_path),
                     "external_data": os.path.relpath(data[0], build_dir) if data else None},
            "inputs": io["inputs"], "outputs": io["outputs"],
            "engine": f"engines/{{key}}/{name}.plan", "golden": golden(name, first)}


def _weak_precision_flags(readiness: Readiness) -> list[str]:
    """TensorRT 8.5 has no strong typing: FP16 weights and Q/DQ layers need their flags."""
    by_type = readiness.weights["bytes_by_type"]
    return (["--fp16"] if by_type.get("FLOAT16") else []) + (["--int8"] if by_type.get("INT8") else [])


def trtexec_flags(spec: dict) -> list[str]:
    """Build flags other than the ONNX, engine and timing-cache paths.

    No ``--shapes``: every input is static, and trtexec refuses explicit shapes for a static model.
    """
    flags = ["--stronglyTyped"] if spec["strongly_typed"] else list(spec["precision_flags"])
    if spec["sparsity"]:
        flags.append("--sparsity=enable")
    flags.append(f"--memPoolSize=workspace:{spec['workspace_mib']}")  # MiB; replaces the deprecated --workspace
    if spec["tensorrt"].split(".")[0] != "8":  # --builderOptimizationLevel exists from 8.6
        flags.append(f"--builderOptimizationLevel={spec['builder_optimization_level']}")
    return [*flags, "--skipInference"]


def trtexec_command(spec: dict, graph: dict, key: str) -> list[str]:
    """One graph's full command, for the record and for rebuilding by hand from build/."""
    return ["trtexec", f"--onnx={graph['onnx']['path']}", *trtexec_flags(spec),
            f"--saveEngine={graph['engine'].format(key=key)}", f"--timingCacheFile={spec['timing_cache'].format(key=key)}"]


def write_material(build_dir: Path, spec: dict, feeds: dict[str, list[dict[str, np.ndarray]]]) -> None:
    """build_spec.json, build_engine.sh and every graph's golden inputs/outputs (ONNX Runtime on this machine);
    ``feeds`` by graph name."""
    build_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "graphs": [{**g, "trtexec": trtexec_command(spec, g, "{key}")} for g in spec["graphs"]]}
    write_atomic(build_dir / "build_spec.json", dump(spec))
    script = build_dir / "build_engine.sh"
    write_atomic(script, build_script(spec))
    script.chmod(0o755)
    for g in spec["graphs"]:
        _write_golden(build_dir, g, feeds[g["name"]])


def _write_golden(build_dir: Path, graph: dict, feeds: list[dict[str, np.ndarray]]) -> None:
    """Inputs and ONNX Runtime outputs in polygraphy's JSON, so the device can compare its engine
    without ONNX Runtime: ``polygraphy run ... --load-inputs ... --load-outputs ...``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    paths = {k: build_dir / v for k, v in graph["golden"].items()}
    paths["inputs"].parent.mkdir(parents=True, exist_ok=True)
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        runner = OnnxrtRunner(SessionFromOnnx(str(build_dir / graph["onnx"]["path"]), providers=["CPUExecutionProvider"]))
        results = Comparator.run([runner], data_loader=feeds)
        save_json(feeds, paths["inputs"])
        results.save(str(paths["outputs"]))


class _ScriptTemplate(string.Template):
    """``@{name}`` placeholders only: the script itself is bash, full of ``$x`` and ``${x}``."""

    delimiter = "@"
    pattern = r"@(?:(?P<escaped>@)|\{(?P<braced>[a-z_][a-z0-9_]*)\}|(?P<named>(?!))|(?P<invalid>(?!)))"


def build_script(spec: dict) -> str:
    """export/templates/build_engine.sh with this spec's target, graphs, flags and tolerances filled in."""
    graphs = spec["graphs"]

    def words(values) -> str:
        return " ".join(shlex.quote(v) for v in values)

    template = _ScriptTemplate(resources.files(__package__).joinpath("templates/build_engine.sh").read_text("utf-8"))
    return template.substitute(
        target=spec["target"], tensorrt=spec["tensorrt"], cc=spec["compute_capability"] or "any",
        names=words(g["name"] for g in graphs), onnx=words(g["onnx"]["path"] for g in graphs),
        sha256=words(g["onnx"]["sha256"] for g in graphs), flags=words(trtexec_flags(spec)),
        inputs=words(g["golden"]["inputs"] for g in graphs), outputs=words(g["golden"]["outputs"] for g in graphs),
        atol=spec["tolerance"]["atol"], rtol=spec["tolerance"]["rtol"], timing=TIMING_CACHE)


# -- building here (optional extra) -------------------------------------------------------------

def unavailable() -> str | None:
    """Why no engine can be built on this machine, or None when one can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed: pip install 'edgeprune[tensorrt]'"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def build_here(build_dir: Path, spec: dict, feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict:
    """Build every graph's engine with the spec's settings on this machine's GPU and compare each with
    ONNX Runtime on its ``feeds``; returns what happened for the manifest (``built: False`` and the
    reason when this machine cannot build)."""
    reason = unavailable()
    if reason:
        return {"built": False, "reason": reason}
    import tensorrt as trt
    import torch

    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    key = engine_key(trt.__version__, cc)
    final = build_dir / "engines" / key
    stage = build_dir / "engines" / f".building-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    if (final / TIMING_CACHE).exists():
        shutil.copy(final / TIMING_CACHE, stage / TIMING_CACHE)
    engines = [_build_one(build_dir, stage, spec, g, feeds[g["name"]], key) for g in spec["graphs"]]
    record = {"key": key, "tensorrt": trt.__version__, "compute_capability": cc,
              "gpu": torch.cuda.get_device_name(), "platform": f"{platform.system()} {platform.machine()}",
              "target": spec["target"], "flags": " ".join(trtexec_flags(spec)),
              "built_by": "export stage (polygraphy)", "created": now(), "engines": engines}
    write_atomic(stage / "engine.json", dump(record))
    shutil.rmtree(final, ignore_errors=True)
    stage.rename(final)
    matches = trt.__version__.startswith(spec["tensorrt"]) and spec["compute_capability"] in (None, cc)
    return {"built": True, "matches_target": matches, **record}


def _build_one(build_dir: Path, stage: Path, spec: dict, graph: dict, feeds: list[dict[str, np.ndarray]],
               key: str) -> dict:
    """One graph's engine into ``stage`` (sharing its timing cache), compared with ONNX Runtime."""
    import tensorrt as trt
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    onnx_path = str(build_dir / graph["onnx"]["path"])
    plan = stage / f"{graph['name']}.plan"
    cache = stage / TIMING_CACHE
    network = NetworkFromOnnxPath(onnx_path, strongly_typed=spec["strongly_typed"])
    config = CreateConfig(sparse_weights=spec["sparsity"],
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: spec["workspace_mib"] << 20},
                          builder_optimization_level=spec["builder_optimization_level"],
                          load_timing_cache=str(cache) if cache.exists() else None)
    engine = SaveEngine(EngineFromNetwork(network, config, save_timing_cache=str(cache)), path=str(plan))
    tol = spec["tolerance"]
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        results = Comparator.run([TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(onnx_path))], data_loader=feeds)
        compare = CompareFunc.simple(atol=tol["atol"], rtol=tol["rtol"])
        passed = bool(Comparator.compare_accuracy(results, compare_func=compare))
    return {"name": graph["name"], "engine": f"engines/{key}/{plan.name}", "plan": plan.name,
            "onnx_sha256": graph["onnx"]["sha256"], "sha256": sha256_path(plan),
            "comparison": {"against": "onnxruntime", **_max_errors(results), **tol, "passed": passed}}


def _max_errors(results) -> dict:
    """Worst absolute and (largest-magnitude-scaled) relative error of the first runner vs the second."""
    (_, trt_iters), (_, ref_iters) = results[0], results[1]
    max_abs = max_rel = 0.0
    for got, ref in zip(trt_iters, ref_iters):
        for name, r in ref.items():
            err = float(np.abs(np.asarray(got[name], np.float64) - np.asarray(r, np.float64)).max())
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / max(float(np.abs(r).max()), 1e-12))
    return {"max_abs_err": max_abs, "max_rel_err": max_rel}

