"""ONNX export with fully static shapes, structural checks, and ONNX Runtime parity.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is the one path: the TorchScript
exporter fails on transformers-5 Llama mask code. It emits opset 18 (TensorRT 10.3's parser takes
opsets up to 20). The IR version is set explicitly because onnx >= 1.23 helpers default to an IR
that onnxruntime 1.31 refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from core.errors import EnvironmentFailure, StageFailed

IR_VERSION = 10
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin
STACK_TRACE = "pkg.torch.onnx.stack_trace"
# evaluation.runtime -> the execution providers a session asks for, in ONNX Runtime's order of preference: nodes
# a GPU provider cannot run fall back to the next (TensorRT -> CUDA -> CPU), as ONNX Runtime documents.
RUNTIMES = {"cpu": ["CPUExecutionProvider"],
            "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
NP_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
             onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.BFLOAT16: "bfloat16"}


def export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names, output_names,
           opset: int) -> onnx.ModelProto:
    """Export ``module`` at the shapes of ``example``; the file is written under a temporary name, then renamed."""
    model = convert(module, example, input_names, output_names, opset)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    save(model, path, external=param_bytes > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(path), full_check=True)
    return model


def convert(module: torch.nn.Module, example: tuple[torch.Tensor, ...], input_names, output_names,
            opset: int) -> onnx.ModelProto:
    """The graph of ``module`` at the shapes of ``example``, with our names and IR version; every dimension static."""
    module.eval()
    with torch.no_grad(), quiet():
        program = torch.onnx.export(module, example, None, opset_version=opset, dynamo=True, optimize=True,
                                    verbose=False)
    return finish(program.model_proto, input_names, output_names)


def finish(model: onnx.ModelProto, input_names, output_names) -> onnx.ModelProto:
    """Our names, IR version and no stack traces on a traced graph; refused unless every dimension is static."""
    for graph in [model.graph, *model.functions]:
        drop_stack_traces(graph)
    rename_io(model, input_names, output_names)
    model.ir_version = IR_VERSION
    problems = static_shape_problems(model)
    if problems:
        raise StageFailed(f"exported graph has dynamic dimensions: {'; '.join(problems[:5])}", field="export")
    return model


def drop_stack_traces(graph: onnx.GraphProto | onnx.FunctionProto) -> None:
    """The exporter records each node's Python stack trace, with the absolute paths of this checkout
    and its virtual environment: the same model exported from two folders would differ in bytes
    (and leak the machine's layout into artifacts). The module path in ``namespace`` stays."""
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs]:
                drop_stack_traces(sub)


@contextlib.contextmanager
def quiet():
    """The exporter logs warnings about optional packages and constant folding; none are actionable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def rename_io(model: onnx.ModelProto, input_names, output_names) -> None:
    """Give graph inputs/outputs our names. Done here rather than by the exporter, which can
    emit an internal value with the same name (aten.embedding's output is called "embedding")."""
    g = model.graph
    wanted = dict(zip([v.name for v in g.input], input_names)) | dict(zip([v.name for v in g.output], output_names))
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    clash = {new: f"{new}__internal" for old, new in wanted.items() if new in taken and new != old}
    mapping = {**clash, **wanted}

    def fix(name: str) -> str:
        return mapping.get(name, name)

    for node in g.node:
        node.input[:] = [fix(n) for n in node.input]
        node.output[:] = [fix(n) for n in node.output]
    for v in [*g.input, *g.output, *g.value_info]:
        v.name = fix(v.name)
    for init in g.initializer:
        init.name = fix(init.name)


def save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if external:
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
    else:
        onnx.save_model(model, tmp)
    tmp.replace(path)


def static_shape_problems(model: onnx.ModelProto) -> list[str]:
    """Every graph input/output dimension must be a fixed positive number."""
    out = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            for i, d in enumerate(v.type.tensor_type.shape.dim):
                if d.HasField("dim_param") or d.dim_value <= 0:
                    out.append(f"{kind} {v.name!r} dim {i} is {d.dim_param or '?'}")
    return out


def io_spec(model: onnx.ModelProto) -> dict:
    def one(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": NP_DTYPES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_value for d in t.shape.dim]}

    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output]}


def check_runtime(runtime: str, field: str = "evaluation.runtime") -> None:
    """Refuse, before any work, a runtime whose first provider this onnxruntime lacks: the CPU-only
    wheel has no CUDA or TensorRT provider, and ONNX Runtime would silently fall back to the CPU."""
    import onnxruntime as ort

    wanted, available = RUNTIMES[runtime][0], ort.get_available_providers()
    if wanted not in available:
        raise EnvironmentFailure(
            f"'{runtime}' needs ONNX Runtime's {wanted}, which this onnxruntime does not have (it has "
            f"{', '.join(available)}): install the gpu extra (pip install 'edgeprune[gpu]'; if the CPU wheel "
            "still shadows it, pip uninstall onnxruntime onnxruntime-gpu, then reinstall the extra), or set "
            "evaluation.runtime: cpu", field=field)


def session(path: Path, threads: int | None = None, disabled_optimizers: tuple[str, ...] = (), runtime: str = "cpu"):
    """An ONNX Runtime session for ``path`` on ``runtime`` (`RUNTIMES`); the parity checks keep the
    default, the CPU, so the artifact is always compared with PyTorch the same way."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=RUNTIMES[runtime],
                                disabled_optimizers=list(disabled_optimizers))


@dataclass
class Parity:
    max_abs_err: float
    max_rel_err: float  # max |ort - torch| / max |torch|, per output, worst output
    samples: int

    def as_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err, "samples": self.samples}


def parity(path: Path, module: torch.nn.Module, input_names, batches: list[tuple[torch.Tensor, ...]],
           keep: list | None = None) -> Parity:
    """Run the same inputs through PyTorch and ONNX Runtime and compare every output.

    The relative error is scaled by each output's largest magnitude: element-wise relative error
    is meaningless where the reference is near zero. ``keep``, when given, receives (inputs by
    name, PyTorch outputs, ONNX Runtime outputs) per batch for task-level metrics.
    """
    module.eval()
    # every reference before the session opens: an offloaded model's (export/offloaded.py) reads its blocks
    # while no graph is loaded
    with torch.no_grad():
        refs = [[t.float().numpy() for t in module(*inputs)] for inputs in batches]
    sess = session(path)
    max_abs = max_rel = 0.0
    n = 0
    for inputs, ref in zip(batches, refs):
        got = sess.run(None, {name: t.numpy() for name, t in zip(input_names, inputs)})
        if keep is not None:
            keep.append((dict(zip(input_names, inputs)), ref, got))
        for r, g in zip(ref, got):
            err = float(np.abs(r - g.astype(np.float32)).max())
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / max(float(np.abs(r).max()), 1e-12))
        n += inputs[0].shape[0]
    return Parity(max_abs, max_rel, n)


def external_files(path: Path) -> list[Path]:
    """The external data files the graph at ``path`` reads (they sit beside it)."""
    model = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return sorted(path.with_name(n) for n in names)


def file_bytes(path: Path) -> int:
    data = path.with_name(f"{path.name}.data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
