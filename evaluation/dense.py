"""The dense model exported at the compressed graph's shapes, cached by source hash, shapes and exporter
(a decoder's two graphs in a folder of their own)."""

from __future__ import annotations

from pathlib import Path

import torch

from calibration.cache import cache_key
from core.lock import flocked
from export import decoder
from export import onnx as onnx_export
from export.decoder import DECODE
from export.spec import ExportSpec
from models.loading import cache_dir
from models.spec import ModelSpec
from tasks import TaskModel
from tasks.decoder import CachedDecoder


def dense_onnx(module: TaskModel, example: tuple[torch.Tensor, ...], source_sha256: str, model: ModelSpec,
               export: ExportSpec) -> Path:
    """The cached file, exported on a miss (the same source, task and shapes give the same graph)."""
    key = cache_key(kind="dense-onnx", model=source_sha256, task=model.task, pooling=model.pooling,
                    normalize=model.normalize, shapes=[list(t.shape) for t in example], opset=export.opset,
                    torch=torch.__version__)
    if isinstance(module, CachedDecoder):  # both graphs, the decode graph written last
        path = cache_dir() / "onnx" / key[:32] / "model.onnx"
        with flocked(path.parent):  # concurrent runs (a sweep): one exports, the others wait and reuse it
            if not path.with_name(f"{DECODE}.onnx").is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                decoder.export(module, example, module.step(example), path, export.opset)
        return path
    path = cache_dir() / "onnx" / f"{key[:32]}.onnx"
    with flocked(path):
        if not path.is_file():
            onnx_export.export(module, example, path, module.input_names, module.output_names, export.opset)
    return path
