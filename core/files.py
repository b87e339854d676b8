"""Files every layer writes the same way: atomically (temp name, then rename), hashed with one sha256."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """A reader never sees half a file: write a hidden temp file beside ``path``, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)


def sha256_path(path: Path) -> str:
    """The one content hash of the project (weights, artifacts, pushed blobs), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def remove_tree(path: Path) -> None:
    """Remove a folder so that a kill midway never leaves a half-deleted one under its name: it is renamed
    to a hidden sibling first (and a sibling left by an earlier kill goes too)."""
    doomed = path.with_name(f".{path.name}.removing")
    if path.is_dir():
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
    elif path.exists() or path.is_symlink():
        path.unlink()
    shutil.rmtree(doomed, ignore_errors=True)


def copy_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of the file or folder ``src`` (copies, not hard links: ONNX refuses to load an
    external-data file that has several links)."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
