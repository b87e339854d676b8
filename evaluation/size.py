"""Model size, dense against compressed: parameters and non-zeros, and for ONNX graphs FLOPs and bytes."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from export import inspect as onnx_inspect
from export import onnx as onnx_export


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def size(dense: nn.Module, compressed: nn.Module, dense_onnx: Path | None = None,
         compressed_onnx: Path | None = None) -> dict:
    """FLOPs (MatMul/Gemm) and file bytes only when both graphs are given."""
    out = {"dense": {"params": params(dense), "nonzero_params": nonzero(dense)},
           "compressed": {"params": params(compressed), "nonzero_params": nonzero(compressed)}}
    if dense_onnx and compressed_onnx:
        for key, path in (("dense", dense_onnx), ("compressed", compressed_onnx)):
            out[key]["flops"] = onnx_inspect.matmul_flops(onnx.load(path))
            out[key]["onnx_bytes"] = onnx_export.file_bytes(path)
    return out
