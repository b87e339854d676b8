"""Tensors read from a safetensors file into memory of their own, not a mapping of the file.

The safetensors library maps the whole file and hands out views of that mapping: every page a
computation touches then counts as the process's resident memory until the last tensor from the
file is freed. An offloaded block released but for one Linear kept all of its pages resident that
way (a 3B model's block: 144 MiB that releasing did not give back), and a weight changed in place
became a private copy beside them. Reading each tensor with ``readinto`` gives plain allocations
that go when the tensor goes; the page cache still serves repeated reads.

The format (https://huggingface.co/docs/safetensors, "Format"): 8 bytes of little-endian header
size N, N bytes of JSON (name -> dtype, shape, data_offsets relative to the end of the header;
optional ``__metadata__``), then the data, little-endian and C-contiguous.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def header(path: Path) -> tuple[dict[str, dict], int]:
    """The file's tensor entries (without ``__metadata__``) and the offset where their data begins."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entries = json.loads(f.read(size))
    entries.pop("__metadata__", None)
    return entries, 8 + size


def read(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``names`` (all when None) from the file at ``path``, on the CPU, each in a new allocation."""
    entries, start = header(path)
    out = {}
    with open(path, "rb") as f:
        for name in entries if names is None else names:
            entry = entries[name]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not read here "
                                 f"(one of {', '.join(DTYPES)})")
            tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            into = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, written by the read
            if f.readinto(into) != end - begin:  # type: ignore[arg-type]  # (numpy's stubs omit its buffer protocol)
                raise ValueError(f"{path}: tensor {name} ends past the end of the file (a truncated download?)")
            out[name] = tensor
    return out
