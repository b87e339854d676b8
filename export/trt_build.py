"""Build material for a TensorRT engine: the spec, the on-device script, golden data, and (with
the ``[tensorrt]`` extra and a GPU) the engine itself.

An engine runs only with the TensorRT version and GPU architecture it was built with, so the
portable artifact is the ONNX plus these exact settings, and engines are built on the device.
Every engine lives under ``build/engines/<key>/`` with ``key = trt<version>-sm<compute capability>``
next to ``engine.json`` recording what it was built with; a build never writes into another key.

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

from .tensorrt import Readiness
from .trt_targets import Target

SPEC_SCHEMA = "edgeprune-trt-build/1"
ENGINE = "model.plan"
TIMING_CACHE = "timing.cache"
GOLDEN_INPUTS = "golden/inputs.json"
GOLDEN_OUTPUTS = "golden/onnxrt_outputs.json"


def engine_key(tensorrt_version: str, compute_capability: str) -> str:
    """``trt10.3.0-sm87``: the two things an engine cannot be moved across."""
    return f"trt{tensorrt_version}-sm{compute_capability.replace('.', '')}"


def build_spec(target: Target, onnx_path: Path, build_dir: Path, io: dict, readiness: Readiness,
               workspace_mib: int, optimization_level: int, atol: float, rtol: float) -> dict:
    onnx_rel = os.path.relpath(onnx_path, build_dir)
    data = onnx_path.with_name(onnx_path.name + ".data")
    strongly_typed = target.major_minor >= (10, 0)  # --stronglyTyped exists from TensorRT 9/10
    sparsity = readiness.sparse_layers > 0
    return {
        "schema": SPEC_SCHEMA,
        "target": target.name, "tensorrt": target.tensorrt, "platform": target.platform,
        "compute_capability": target.compute_capability,
        "onnx": {"path": onnx_rel, "sha256": sha256_path(onnx_path),
                 "external_data": os.path.relpath(data, build_dir) if data.exists() else None},
        "inputs": io["inputs"], "outputs": io["outputs"],
        "strongly_typed": strongly_typed,
        "precision_flags": [] if strongly_typed else _weak_precision_flags(readiness),
        "sparsity": sparsity, "sparse_layers": readiness.sparse_layers,
        "workspace_mib": workspace_mib, "builder_optimization_level": optimization_level,
        "engine": f"engines/{{key}}/{ENGINE}", "timing_cache": f"engines/{{key}}/{TIMING_CACHE}",
        "key": engine_key("<tensorrt version>", "<compute capability>"),
        "golden": {"inputs": GOLDEN_INPUTS, "outputs": GOLDEN_OUTPUTS, "atol": atol, "rtol": rtol},
    }


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


def trtexec_command(spec: dict, key: str) -> list[str]:
    """The full command, for the record and for rebuilding by hand from build/."""
    return ["trtexec", f"--onnx={spec['onnx']['path']}", *trtexec_flags(spec),
            f"--saveEngine={spec['engine'].format(key=key)}", f"--timingCacheFile={spec['timing_cache'].format(key=key)}"]


def write_material(build_dir: Path, spec: dict, feeds: list[dict[str, np.ndarray]]) -> None:
    """build_spec.json, build_engine.sh and golden inputs/outputs (ONNX Runtime on this machine)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "trtexec": trtexec_command(spec, "{key}")}
    write_atomic(build_dir / "build_spec.json", dump(spec))
    script = build_dir / "build_engine.sh"
    write_atomic(script, build_script(spec))
    script.chmod(0o755)
    _write_golden(build_dir, build_dir / spec["onnx"]["path"], feeds)


def _write_golden(build_dir: Path, onnx_path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Inputs and ONNX Runtime outputs in polygraphy's JSON, so the device can compare its engine
    without ONNX Runtime: ``polygraphy run ... --load-inputs ... --load-outputs ...``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    (build_dir / "golden").mkdir(exist_ok=True)
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))
        results = Comparator.run([runner], data_loader=feeds)
        save_json(feeds, build_dir / GOLDEN_INPUTS)
        results.save(str(build_dir / GOLDEN_OUTPUTS))


class _ScriptTemplate(string.Template):
    """``@{name}`` placeholders only: the script itself is bash, full of ``$x`` and ``${x}``."""

    delimiter = "@"
    pattern = r"@(?:(?P<escaped>@)|\{(?P<braced>[a-z_][a-z0-9_]*)\}|(?P<named>(?!))|(?P<invalid>(?!)))"


def build_script(spec: dict) -> str:
    """export/templates/build_engine.sh with this spec's target, graph, flags and tolerances filled in."""
    flags = " ".join(shlex.quote(f) for f in trtexec_flags(spec))
    g = spec["golden"]
    template = _ScriptTemplate(resources.files(__package__).joinpath("templates/build_engine.sh").read_text("utf-8"))
    return template.substitute(
        target=spec["target"], tensorrt=spec["tensorrt"], cc=spec["compute_capability"] or "any",
        onnx=shlex.quote(spec["onnx"]["path"]), sha256=spec["onnx"]["sha256"], flags=flags,
        inputs=shlex.quote(g["inputs"]), outputs=shlex.quote(g["outputs"]), atol=g["atol"], rtol=g["rtol"],
        engine=ENGINE, timing=TIMING_CACHE)


# -- building here (optional extra) -------------------------------------------------------------

def unavailable() -> str | None:
    """Why no engine can be built on this machine, or None when one can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed: pip install 'edgeprune[tensorrt]'"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def build_here(build_dir: Path, spec: dict, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Build the engine with the spec's settings on this machine's GPU and compare it with ONNX
    Runtime on ``feeds``; returns what happened for the manifest (``built: False`` and the reason
    when this machine cannot build)."""
    reason = unavailable()
    if reason:
        return {"built": False, "reason": reason}
    import tensorrt as trt
    import torch
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    key = engine_key(trt.__version__, cc)
    onnx_path = str(build_dir / spec["onnx"]["path"])
    final = build_dir / "engines" / key
    stage = build_dir / "engines" / f".building-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    if (final / TIMING_CACHE).exists():
        shutil.copy(final / TIMING_CACHE, stage / TIMING_CACHE)
    network = NetworkFromOnnxPath(onnx_path, strongly_typed=spec["strongly_typed"])
    config = CreateConfig(sparse_weights=spec["sparsity"],
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: spec["workspace_mib"] << 20},
                          builder_optimization_level=spec["builder_optimization_level"],
                          load_timing_cache=str(stage / TIMING_CACHE) if (stage / TIMING_CACHE).exists() else None)
    engine = SaveEngine(EngineFromNetwork(network, config, save_timing_cache=str(stage / TIMING_CACHE)),
                        path=str(stage / ENGINE))
    g = spec["golden"]
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        results = Comparator.run([TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(onnx_path))], data_loader=feeds)
        compare = CompareFunc.simple(atol=g["atol"], rtol=g["rtol"])
        passed = bool(Comparator.compare_accuracy(results, compare_func=compare))
    errors = _max_errors(results)
    record = {"key": key, "tensorrt": trt.__version__, "compute_capability": cc,
              "gpu": torch.cuda.get_device_name(), "platform": f"{platform.system()} {platform.machine()}",
              "target": spec["target"], "onnx_sha256": spec["onnx"]["sha256"], "sha256": sha256_path(stage / ENGINE),
              "flags": " ".join(trtexec_flags(spec)), "built_by": "export stage (polygraphy)", "created": now(),
              "comparison": {"against": "onnxruntime", **errors, "atol": g["atol"], "rtol": g["rtol"],
                             "passed": passed}}
    write_atomic(stage / "engine.json", dump(record))
    shutil.rmtree(final, ignore_errors=True)
    stage.rename(final)
    matches = trt.__version__.startswith(spec["tensorrt"]) and spec["compute_capability"] in (None, cc)
    return {"built": True, "engine": f"engines/{key}/{ENGINE}", "matches_target": matches, **record}


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

