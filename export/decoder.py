"""A causal LM's two decoder graphs over a static KV cache, written with one weight file between them.

The prefill graph (``model.onnx``: the recipe's ``seq_len`` tokens) and the decode graph
(``decode.onnx``: one token) are exported from the same module (tasks/decoder.py), so they hold the
same weights, but the exporter names them per graph (folded transposes get generated names). They
are therefore matched by content: every initializer of at least ``SHARED_MIN_BYTES`` is written
once into ``model.onnx.data`` at an aligned offset, and both graphs point at it. ONNX Runtime and
TensorRT's parser resolve that location next to the graph file, so the graphs travel together.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import set_external_data

from core.errors import StageFailed

from . import onnx as onnx_export

DECODE = "decode"  # the decode graph's name (its engine, golden folder); the file is decode.onnx
SHARED_MIN_BYTES = 1024  # smaller constants (shapes, axes, scalars) stay inside each graph
ALIGN = 4096  # offsets on page boundaries, so a runtime can map the file


def export(module: torch.nn.Module, prefill: tuple[torch.Tensor, ...], step: tuple[torch.Tensor, ...], path: Path,
           opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The prefill graph at ``path`` and the decode graph beside it (``decode.onnx``), sharing ``path``.data;
    ``prefill`` and ``step`` are the module's positional inputs for each."""
    graphs = tuple(onnx_export.convert(module, example, module.input_names, module.output_names, opset)
                   for example in (prefill, step))
    paths = [path, path.with_name(f"{DECODE}.onnx")]
    save_shared(list(graphs), paths)
    for p in paths:
        onnx.checker.check_model(str(p), full_check=True)
    return graphs[0], graphs[1]


def save_shared(models: list[onnx.ModelProto], paths: list[Path]) -> None:
    """Write each model to its path, every large initializer once into ``<first path>.data``.

    The models in memory keep their weights (the gate reads them); the files get copies pointing
    into the data file. Each file is written under a temporary name and renamed, the data first.
    """
    data = paths[0].with_name(f"{paths[0].name}.data")
    tmp_data = data.with_name(f".{data.name}.tmp")
    placed: dict[tuple, tuple[int, int]] = {}
    outs = []
    with open(tmp_data, "wb") as f:
        for model in models:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            for tensor in out.graph.initializer:
                if len(tensor.raw_data) < SHARED_MIN_BYTES:
                    continue
                raw = tensor.raw_data
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).hexdigest())
                if key not in placed:
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    placed[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = placed[key]
                set_external_data(tensor, location=data.name, offset=offset, length=length)
                tensor.ClearField("raw_data")
            outs.append(out)
    tmp_data.replace(data)
    for out, path in zip(outs, paths):
        onnx_export.save(out, path, external=False)


def check_continuation(prefill: Path, decode: Path, names: tuple[str, ...], example: tuple[torch.Tensor, ...],
                       tolerance: float, field: str) -> dict:
    """The decode graph must continue the prefill graph, whatever their precision.

    Given the cache the prefill graph wrote for ``example`` and the prompt's last token again at its
    own position (which rewrites that slot with the same values), the decode graph must return the
    prefill graph's last row of logits: same top-1 token, relative error within ``tolerance``. This
    checks a rewritten decode graph against its own prefill graph, in ONNX Runtime, where a
    comparison of one token's logits with the float model would say little.
    """
    feeds = {n: t.numpy() for n, t in zip(names, example)}
    logits, *cache = onnx_export.session(prefill).run(None, feeds)
    ids, positions, slots = feeds[names[0]][:, -1:], feeds[names[1]][:, -1:], feeds[names[2]][-1:]
    got = onnx_export.session(decode).run(None, dict(zip(names, [ids, positions, slots, *cache])))[0]
    ref = logits[:, -1:]
    err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
    same = bool((got.argmax(-1) == ref.argmax(-1)).all())
    if err > tolerance or not same:
        raise StageFailed(f"{decode.name} does not continue {prefill.name}: its logits for the prompt's last token "
                          f"differ by {err:.3g} of their largest value (tolerance {tolerance:g}), top-1 "
                          f"{'kept' if same else 'changed'}", field=field)
    return {"max_rel_err": err, "top1_same": same, "tolerance": tolerance}
