"""The run folder: written under a temporary name, renamed into place only when complete.

Layout of ``runs/<name>/``: recipe.yaml (resolved), model.onnx, checkpoint/, report.md,
events.jsonl, manifest.json, and stages/NN-label/result.json (one per stage; with the stage's
model snapshot while the run is in progress, so --resume can continue after a failure).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from core.errors import RecipeError
from core.files import sha256_path

SCHEMA = "edgeprune-manifest/1"
PACKAGES = ("edgeprune", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "safetensors",
            "tokenizers", "pydantic", "gguf")


class RunFolder:
    def __init__(self, final: Path):
        self.final = final
        self.partial = final.parent / f".{final.name}.partial"

    def open(self, force: bool, resume: bool) -> bool:
        """Create (or, with resume, reuse) the partial folder; True when resuming."""
        if self.final.exists() and not force:
            raise RecipeError(f"run folder '{self.final}' already exists; pass --force to replace it "
                              "or --output to write elsewhere", field="output")
        if resume and self.partial.is_dir():
            return True
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return False

    def stage_dir(self, index: int, label: str) -> Path:
        return self.partial / "stages" / f"{index:02d}-{label}"

    def drop_snapshots(self) -> None:
        """Model snapshots only serve --resume; a complete run does not ship them."""
        for snapshot in self.partial.glob("stages/*/model"):
            shutil.rmtree(snapshot)

    def finalize(self) -> Path:
        """Swap the complete partial folder into place (the old run, with --force, goes last)."""
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            self.final.rename(old)
        self.partial.rename(self.final)
        if old is not None:
            shutil.rmtree(old)
        return self.final


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


def artifacts(folder: Path) -> list[dict]:
    """Every file of the run except the manifest itself, with size and sha256."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == "manifest.json":
            continue
        out.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_path(path)})
    return out
