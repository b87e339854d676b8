"""Export of an offloaded model (``model.offload``, models/offload.py) without a second copy of its weights.

The in-memory export traces real weights, lets the optimizer fold them (a Linear's weight is stored
transposed, as MatMul's [K, N] B) and holds the whole ONNX proto beside the model. Here the task
model is traced on its meta skeleton: each weight initializer becomes a graph input while the
optimizer runs (so nothing reads its missing data), a Transpose of one becomes a transposed weight as
the optimizer would have folded it, and the weights are then written block by block from the
safetensors files into one external data file, each initializer an (offset, length) entry in it. At
most one block of weights (or the embedding table, or the head) is in memory while writing.

The PyTorch side of the parity check is `Streamed`: the same task model run with each block read as
its forward begins (Offloaded.streamed), never a second whole model.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch import nn

from core.errors import StageFailed
from core.memory import row_slices
from models.offload import Offloaded

from . import onnx as onnx_export

ALIGN = 4096  # each tensor starts on a page: ONNX Runtime can map the file instead of copying it
CHUNK_ELEMENTS = 2**24  # 64 MiB of float32 written at a time


def export(module: nn.Module, weights: Offloaded, example: tuple[torch.Tensor, ...], path: Path,
           opset: int) -> onnx.ModelProto:
    """``module`` (a task model over ``weights.model``) as ``path`` and ``path``.data, at ``example``'s shapes.
    In float32, as the in-memory export (a model loads in float32): the skeleton is cast, whatever dtype
    its config names (its meta tensors change in place, so a tied head stays tied)."""
    module.float().eval()
    with torch.no_grad(), onnx_export.quiet():
        program = torch.onnx.export(module, example, None, opset_version=opset, dynamo=True, optimize=False,
                                    verbose=False)
        graph = program.model.graph
        sources = _lift(graph, _file_names(module, weights))
        program.optimize()
    entries = _fold_transposes(graph, sources)
    data = path.with_name(f"{path.name}.data")
    with weights.read_as(_dtype(module)):
        _write(graph, entries, weights, data)
    model = onnx_export.finish(ir.serde.serialize_model(program.model), module.input_names, module.output_names)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, tmp)
    tmp.replace(path)
    onnx.checker.check_model(str(path), full_check=True)
    return model


def _dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _file_names(module: nn.Module, weights: Offloaded) -> dict[int, str]:
    """Each meta tensor of the skeleton (by identity) -> its name in the weight files (a tied head's is
    the embedding's, which the files hold)."""
    state = weights.model.state_dict(keep_vars=True)
    return {id(t): name for name, t in state.items() if name in weights.shards.files}


def _lift(graph: ir.Graph, names: dict[int, str]) -> dict[str, str]:
    """Weight initializers (meta data) -> graph inputs while the optimizer runs; returns value name -> file name."""
    sources = {}
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.is_meta:
            if id(raw) not in names:
                raise StageFailed(f"the graph's weight {name} is in none of the model's safetensors files",
                                  field="export")
            sources[name] = names[id(raw)]
            graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
    return sources


def _fold_transposes(graph: ir.Graph, sources: dict[str, str]) -> dict[str, tuple[ir.Value, str, bool]]:
    """Weight inputs back to initializers; a 2-D Transpose that is a weight's only use becomes a transposed
    initializer (what constant folding gives the in-memory export). Returns initializer name -> (value, file name, transposed)."""
    lifted = {v.name: v for v in graph.inputs if v.name in sources}
    for value in lifted.values():
        graph.inputs.remove(value)
    entries = {}
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or src.name not in lifted or len(src.shape) != 2 or len(src.uses()) > 1:
            continue  # a weight read elsewhere too (a tied head's embedding) is stored once, as the optimizer leaves it
        out = node.outputs[0]
        folded = ir.Value(name=out.name, shape=ir.Shape(list(reversed(src.shape))), type=src.type)
        out.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        entries[folded.name] = (folded, sources[src.name], True)
    for name, value in lifted.items():
        if value.uses():
            entries[name] = (value, sources[name], False)
    return entries


def _write(graph: ir.Graph, entries: dict[str, tuple[ir.Value, str, bool]], weights: Offloaded, data: Path) -> None:
    """Every entry's bytes into ``data``, one group of the weight files at a time, and each value an
    external initializer pointing at its bytes."""
    wanted: dict[str, list[tuple[ir.Value, bool]]] = {}
    for value, source, transposed in entries.values():
        wanted.setdefault(source, []).append((value, transposed))
    with data.open("wb") as f:
        for _, group in weights.tensors():
            for source in list(group):
                tensor = group.pop(source)  # gone once written: not held while the next group is read
                for value, transposed in wanted.pop(source, []):
                    f.seek(-f.tell() % ALIGN, 1)
                    offset = f.tell()
                    length = _write_tensor(f, tensor.T if transposed else tensor)
                    value.const_value = ir.ExternalTensor(data.name, offset, length, value.dtype,
                                                          shape=value.shape, name=value.name, base_dir=data.parent)
                    graph.register_initializer(value)
                del tensor
    if wanted:
        raise StageFailed(f"the model's safetensors files lack {', '.join(sorted(wanted))}", field="export")


def _write_tensor(f, tensor: torch.Tensor) -> int:
    """``tensor``'s bytes, row-major, a slice of rows at a time: a transposed table (a 49152 x 3072 head:
    604 MB in float32) is never copied whole."""
    for rows in row_slices(tensor, CHUNK_ELEMENTS):
        f.write(tensor[rows].contiguous().numpy().data)
    return tensor.numel() * tensor.element_size()


class Streamed(nn.Module):
    """The task model's forward on an offloaded model, one block in memory at a time: the PyTorch side
    of the parity check and of the golden outputs."""

    def __init__(self, module: nn.Module, weights: Offloaded):
        super().__init__()
        self.inner, self.weights = module, weights
        self.task, self.input_names, self.output_names = module.task, module.input_names, module.output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.weights.read_as(_dtype(self.inner)), self.weights.streamed():
            return self.inner(*inputs)
