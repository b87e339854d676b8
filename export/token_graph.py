"""Checks on an exported graph with a token selector, and the graphs exported next to it.

TensorRT readiness (operators, constant TopK K below 3840, static shapes) is the export stage's
``export.tensorrt.check`` for the recipe's target, run on this same graph; here: the selection's
own guarantees (K fixed in the graph, identical indices in ONNX Runtime and PyTorch) and the
companion graphs (TRIM's text encoder, with the tokenizer its input ids are made with).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from core.errors import StageFailed
from export import onnx as onnx_export

from .graph import constant


def topk_constants(model: onnx.ModelProto) -> list[int | None]:
    """The K of every TopK node, in graph order; None where K is computed at run time."""
    ks = [constant(n.inputs[1]) for n in ir.from_proto(model).graph if n.op_type == "TopK"]
    return [None if k is None else int(k.reshape(-1)[0]) for k in ks]


def check_export(tokens, model: onnx.ModelProto, path: Path, module, inputs: list[tuple], opset: int,
                 rtol: float) -> dict:
    """Run after model.onnx is written: constant K, exact index parity, companion graphs."""
    ks = topk_constants(model)
    if None in ks:
        raise StageFailed("token selection exported a TopK whose K is computed in the graph; the engine needs a "
                          "constant K (static shapes)", field="export")
    report = {"topk_k": sorted(set(ks)), **tokens.describe()}
    if tokens.output_names:  # the graph outputs the indices (a VLM's graph goes on to logits: parity covers it)
        report["index_parity"] = _index_parity(path, module, inputs)
    report["companions"] = [_export_companion(path.parent, c, opset, rtol) for c in tokens.companions]
    return report


def _index_parity(path: Path, module, inputs: list[tuple]) -> str:
    """Selected indices must be identical in ONNX Runtime and PyTorch (a tolerance would hide a swap)."""
    import torch

    sess = onnx_export.session(path)
    for batch in inputs:
        with torch.no_grad():
            want = module(*batch)[1].numpy()
        got = sess.run(["token_index"], {n: t.numpy() for n, t in zip(module.input_names, batch)})[0]
        if not np.array_equal(want, got):
            raise StageFailed(f"ONNX Runtime selected other tokens than PyTorch ({int((want != got).sum())} of "
                              f"{want.size} indices differ)", field="export")
    return "identical"


def _export_companion(folder: Path, companion, opset: int, rtol: float) -> dict:
    path = folder / companion.file
    proto = onnx_export.export(companion.module, companion.example, path, companion.module.input_names,
                               companion.module.output_names, opset)
    par = onnx_export.parity(path, companion.module, companion.module.input_names, [companion.example])
    if par.max_rel_err > rtol:
        raise StageFailed(f"{companion.file}: ONNX Runtime differs from PyTorch: max relative error "
                          f"{par.max_rel_err:.3g} > export.rtol {rtol:g}", field="export")
    for name, asset in companion.assets:  # e.g. the text graph's tokenizer: what its inputs are made with
        asset.save_pretrained(folder / name)
    return {"path": companion.file, **onnx_export.io_spec(proto), "parity": par.as_dict(),
            "assets": [name for name, _ in companion.assets]}
