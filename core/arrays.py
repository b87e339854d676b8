"""Row arrays on disk: named arrays sharing a first axis (one row per sample), written chunk by chunk
and read back memory-mapped. The distill stage keeps its teacher's outputs this way.

Each array is a standard NumPy ``.npy`` file, filled in place through a memory map, so writing holds
one chunk in memory and reading pages in only the rows asked for (safetensors and ``torch.save``
write a whole dict at once). ``index.json`` is written last and records the key the rows were
computed for and every file's size: a store interrupted mid-write, truncated, or written for other
inputs is never taken as complete.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .files import write_atomic

INDEX = "index.json"


def row_bytes(shapes: dict[str, tuple[int, ...]], dtype: type[np.generic] = np.float16) -> int:
    """Bytes of one row across the arrays (``shapes`` excludes the row axis)."""
    return sum(math.prod(s) for s in shapes.values()) * np.dtype(dtype).itemsize


class RowWriter:
    """Creates ``<name>.npy`` of ``rows`` rows per array in an emptied ``folder``; ``write`` fills a
    chunk of rows, ``close`` flushes and writes the index that marks the store complete."""

    def __init__(self, folder: Path, key: str, rows: int, shapes: dict[str, tuple[int, ...]],
                 dtype: type[np.generic] = np.float16):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.key = folder, key
        self.arrays = {name: open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(rows, *shape))
                       for name, shape in shapes.items()}

    def write(self, start: int, chunk: dict[str, np.ndarray]) -> None:
        for name, rows in chunk.items():
            self.arrays[name][start:start + len(rows)] = rows

    def close(self) -> None:
        files = {}
        for name, array in self.arrays.items():
            array.flush()
            files[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                           "bytes": (self.folder / f"{name}.npy").stat().st_size}
        self.arrays.clear()
        write_atomic(self.folder / INDEX, json.dumps({"key": self.key, "files": files}, indent=1))


def read_rows(folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The arrays as memory-mapped tensors when the store in ``folder`` is complete and was written
    for ``key``; None otherwise (no store, another key, or a file of the wrong size)."""
    index = folder / INDEX
    if not index.is_file():
        return None
    info = json.loads(index.read_text())
    paths = {name: folder / f"{name}.npy" for name in info["files"]}
    if info["key"] != key or any(not p.is_file() or p.stat().st_size != info["files"][n]["bytes"]
                                 for n, p in paths.items()):
        return None
    # mode "c" (copy-on-write) maps the file read-only on disk but gives torch a writable array
    return {name: torch.from_numpy(np.load(p, mmap_mode="c")) for name, p in paths.items()}
