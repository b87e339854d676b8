"""What manifest.json records besides the stages: the environment and every file with its sha256.

Layout of ``runs/<name>/``: recipe.yaml (resolved), model.onnx, checkpoint/, report.md,
events.jsonl, manifest.json, and stages/NN-label/result.json (one per stage; with the stage's
snapshots while the run is in progress, so --resume can continue after a failure: pipeline/folder.py).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from core.files import sha256_path

SCHEMA = "edgeprune-manifest/1"
PACKAGES = ("edgeprune", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "safetensors",
            "tokenizers", "pydantic", "gguf")


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "packages": versions, "git_sha": _git_sha()}


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def artifacts(folder: Path, skip: tuple[Path, ...] = ()) -> list[dict]:
    """Every file of the run except the manifest itself (and what is under ``skip``), with size and sha256."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "manifest.json" or any(s in path.parents for s in skip):
            continue
        out.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_path(path)})
    return out
