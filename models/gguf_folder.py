"""A GGUF file to a sharded fp32 safetensors folder, streamed: one block's tensors in memory at a time.

Loading a GGUF with transformers dequantizes every tensor into one state dict before the model sees
it, so a GGUF larger than memory could not be converted, let alone offloaded. Here the file is
memory-mapped (gguf's reader) and walked group by group: each ``blk.N`` block, then each tensor
outside the blocks (embeddings, final norm, head), each group dequantized, renamed and written to a
safetensors file of its own before the next is read. The renaming and the per-tensor fix-ups (the
q/k rotary permutation llama.cpp applies, Gemma's norm offset) are transformers' own
(`get_gguf_hf_weights_map` and the architecture's tensor processor), so the folder holds exactly
the weights ``from_pretrained(..., gguf_file=...)`` gives; the config and the tokenizer are
transformers' GGUF parsing too.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from core.echo import clip
from core.errors import RecipeError
from core.events import Events, ProgressTask

from .offload import INDEX, map_large_allocations, skeleton, trim_heap

BLOCK = re.compile(r"^blk\.(\d+)\.")
ROWS = 4096  # rows dequantized at a time (`_dense`)


def convert_gguf(path: Path, target: Path, field: str = "model.source", events: Events | None = None) -> None:
    """Write ``path``'s model to the folder ``target`` (config, tokenizer, one safetensors file per tensor
    group and ``model.safetensors.index.json``), through ``target.tmp`` renamed at the end; with
    ``events``, a progress bar over the groups (on the run's console, or a sweep run's log)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    map_large_allocations()  # each group's arrays are freed back to the OS, not kept in glibc's heap
    arch, tensors = _tensors(path, field)
    processor = _processor(arch, path, field)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    trim_heap()  # each metadata parse held every token as a numpy view; give that back before the weights
    model = skeleton(AutoModelForCausalLM, config)
    groups = _groups(tensors)
    bar = events.task(f"converting {path.name}", len(groups)) if events else None
    weight_map = _write_groups(groups, processor, _hf_names(model, processor), tmp, bar)
    _check_complete(model, weight_map, path, field)
    (tmp / INDEX).write_text(json.dumps({"metadata": {"converted_from": path.name}, "weight_map": weight_map}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _write_groups(groups: list[list], processor, names: dict[str, str], folder: Path, bar: ProgressTask | None
                  ) -> dict[str, str]:
    """Each group dequantized, written to its own file and freed before the next; the index's weight map."""
    weight_map: dict[str, str] = {}
    for group in groups:
        dense = dict(_dequantized(group, processor, names))
        if dense:
            file = f"{_group_name(list(dense))}.safetensors"
            save_file(dense, str(folder / file))
            weight_map.update(dict.fromkeys(dense, file))
        del dense
        trim_heap()
        if bar:
            bar.advance()
    if bar:
        bar.done()
    return weight_map


def _tensors(path: Path, field: str) -> tuple[str, list]:
    """The file's architecture and its tensors (views of the memory-mapped file); the reader, whose parsed
    metadata holds every token as a numpy view (160 MiB for SmolLM2's 49k), is not kept."""
    from transformers.modeling_gguf_pytorch_utils import read_field

    reader = open_gguf(path, field)
    return read_field(reader, "general.architecture")[0], reader.tensors


def open_gguf(path: Path, field: str):
    """gguf's memory-mapped reader over ``path``; bytes that are not GGUF, or a GGUF that names no
    architecture, are a user error naming ``field``."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        if "general.architecture" not in reader.fields:
            raise ValueError("no general.architecture")
    except Exception as e:  # the reader fails in many ways on bytes that are not GGUF; each means the same
        raise RecipeError(f"{str(path)!r} is not a readable GGUF file ({clip(str(e) or type(e).__name__, 80)}); "
                          "give an intact .gguf file or a model folder", field=field) from None
    return reader


def _processor(arch: str, path: Path, field: str):
    """transformers' tensor processor for the file's architecture, given its parsed config (head counts);
    architectures whose tensors do not convert one at a time (mixture-of-experts tensors split or
    merged across GGUF tensors, those transformers converts by another path) are refused."""
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint

    cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if is_gguf_arch_supported(arch) or cls.perform_fallback_tensor_mapping is not TensorProcessor.perform_fallback_tensor_mapping:
        raise RecipeError(f"{str(path)!r} is a {arch!r} GGUF, whose tensors do not convert one at a time; "
                          "give a dense (not mixture-of-experts) GGUF or a safetensors folder", field=field)
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:  # "GGUF model with architecture X is not supported yet."
        raise RecipeError(f"{str(path)!r}: {e}", field=field) from None
    return cls(config=parsed["config"])


def _hf_names(model: torch.nn.Module, processor) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, from transformers' own table for this model."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    return get_gguf_hf_weights_map(model, processor)


def _groups(tensors) -> list[list]:
    """The file's tensors grouped: one list per ``blk.N`` block (in block order), then one per other tensor."""
    blocks: dict[int, list] = {}
    rest = []
    for t in tensors:
        m = BLOCK.match(t.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(t)
        else:
            rest.append([t])
    return [blocks[i] for i in sorted(blocks)] + rest


def _dequantized(tensors: list, processor, names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor dequantized to fp32 and fixed up as transformers loads it, under its transformers
    name; tensors transformers does not load (llama.cpp's precomputed rope factors) are skipped."""
    for t in tensors:
        result = processor.process(weights=_dense(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping=names, parsed_parameters={"tensors": {}})
        if result.name in names:
            weights = np.ascontiguousarray(result.weights, dtype=np.float32)  # a copy only where needed:
            yield names[result.name], torch.from_numpy(weights if weights.flags.writeable else weights.copy())


def _dense(data: np.ndarray, ggml_type) -> np.ndarray:
    """gguf's dequantization of ``data``, ROWS rows at a time into one array: its numpy code makes several
    temporaries the size of what it is given (SmolLM2's 49k-row embedding peaked 216 MiB above its
    fp32 size at once; each row is quantized on its own, so the slices give the same numbers)."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= ROWS:
        return dequantize(data, ggml_type)
    first = dequantize(data[:ROWS], ggml_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:ROWS] = first
    for r in range(ROWS, data.shape[0], ROWS):
        out[r:r + ROWS] = dequantize(data[r:r + ROWS], ggml_type)
    return out


def _group_name(names: list[str]) -> str:
    """A block's file is named by its module (``model.layers.3``), another tensor's by its own module."""
    m = re.match(r"^(.*?\.\d+)\.", names[0])
    return m.group(1) if m and len(names) > 1 else names[0].removesuffix(".weight").removesuffix(".bias")


def _check_complete(model: torch.nn.Module, weight_map: dict[str, str], path: Path, field: str) -> None:
    """Every parameter the model loads is in the folder (a head tied to the embeddings is loaded from them)."""
    written = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in weight_map}
    missing = [n for n, p in model.named_parameters() if id(p) not in written]
    if missing:
        raise RecipeError(f"{str(path)!r} has no tensor for {len(missing)} parameter(s) of its model "
                          f"({', '.join(missing[:3])}); give an intact GGUF file", field=field)
