"""A VLM's three graphs: vision.onnx, and the prefill and decode graphs sharing model.onnx.data.

The modules are tasks/image_decoder.py's; the decoder pair is written as export/decoder.py writes a
causal LM's (large initializers once, matched by content), the vision graph on its own (its
weights, the vision tower's and the projector's, are in no other graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from models.adapters import Adapter
from models.spec import ModelSpec
from tasks.image_decoder import VISION, ImageDecoder, ImagePrefill, VisionGraph

from . import onnx as onnx_export
from .decoder import DECODE, save_shared
from .gate import MAIN


@dataclass(frozen=True)
class Traced:
    """One of the three graphs before it is written: its module and the example inputs it is traced on."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Exported:
    """One written graph, with the module and example inputs it must agree with."""

    name: str
    proto: onnx.ModelProto
    path: Path
    module: nn.Module
    example: tuple[torch.Tensor, ...]


def traced(model: nn.Module, spec: ModelSpec, adapter: Adapter, max_len: int, pixel_values: torch.Tensor,
           input_ids: torch.Tensor) -> list[Traced]:
    """The prefill, decode and vision modules with their examples: one image (``pixel_values`` [1, 3, H, W],
    a token selector's inputs at their defaults) and its prompt (``input_ids`` [1, seq_len], K placeholders
    first, right-padded). What the export writes and what a later stage (quantize) gates the graphs on."""
    vision = VisionGraph(model, spec).eval()
    prefill = ImagePrefill(model, spec, adapter, max_len).eval()
    decode = ImageDecoder(model, spec, adapter, max_len).eval()
    seen = vision.example({"pixel_values": pixel_values})  # the selector's inputs at their defaults
    with torch.no_grad():
        images = vision(*seen)[0]
    pos = torch.arange(input_ids.shape[1])
    first = (input_ids, pos.repeat(1, 1), pos, *prefill.empty_cache(1), images)  # no aliased inputs: they trace symbolic
    return [Traced(MAIN, prefill, first), Traced(DECODE, decode, prefill.step(first)), Traced(VISION, vision, seen)]


def export(graphs: list[Traced], folder: Path, opset: int) -> list[Exported]:
    """The prefill graph (model.onnx) and the decode graph (decode.onnx) sharing one weight file, and the
    vision graph (vision.onnx) on its own."""
    (prefill, decode, vision) = graphs
    pair = [onnx_export.convert(g.module, g.example, g.module.input_names, g.module.output_names, opset)
            for g in (prefill, decode)]
    paths = [folder / "model.onnx", folder / f"{DECODE}.onnx"]
    save_shared(pair, paths)
    for p in paths:
        onnx.checker.check_model(str(p), full_check=True)
    vision_path = folder / f"{VISION}.onnx"
    vision_proto = onnx_export.export(vision.module, vision.example, vision_path, vision.module.input_names,
                                      vision.module.output_names, opset)
    return [Exported(g.name, proto, path, g.module, g.example)
            for g, proto, path in zip(graphs, [*pair, vision_proto], [*paths, vision_path])]
