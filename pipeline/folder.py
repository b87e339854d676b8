"""The run folder while it is written, and what makes a killed run resumable.

A run holds ``runs/.NAME.lock``, writes ``runs/.NAME.partial/`` and renames it to ``runs/NAME/``
when complete; ``--resume`` continues the partial folder. A kill -9 at any moment leaves one that
``--resume`` completes to the same artifacts, because:

- a stage is complete once its record (``stages/NN-label/result.json``) exists, and the runner
  writes it last, after the stage's files and its model snapshot (``model/``);
- a stage may create files at the top of the run folder (model.onnx, build/, preprocessor/,
  generation/, GGUF files) and replace ones an earlier stage left (quantize replaces model.onnx and build/): every
  stage first records the names there and keeps a copy of what it replaces (``before/``). The
  first stage that runs again in a resumed folder (after a kill, or with changed arguments) puts
  those back and removes what it had created, so it starts from the same files whatever it had
  half written;
- manifest.json is written last in the partial folder. Once it is there and matches the recipe and
  model (`committed`), only dropping the snapshots and the rename are left, and a resume does just
  that; until the rename, the partial folder holds everything a resume needs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from core.errors import EnvironmentFailure, RecipeError
from core.files import copy_tree, remove_tree
from core.lock import FolderLock

from .manifest import artifacts

RUNNER_OWN = frozenset({"stages", "events.jsonl", "recipe.yaml", "manifest.json", "report.md", "checkpoint"})
MODEL, BEFORE = "model", "before"  # a stage folder's snapshots: for --resume only, never shipped
ENTRIES = "entries.json"  # in before/: the top-level names when the stage began; the copies go in before/files/


class RunFolder:
    def __init__(self, final: Path):
        self.final = final
        self.partial = final.parent / f".{final.name}.partial"

    def lock(self, note: Callable[[str], None]) -> FolderLock:
        """Held from before the partial folder is touched until the run (and its push) ends: a second
        run on the same output refuses instead of deleting this one's partial folder (core/lock.py)."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        return FolderLock(self.final.parent / f".{self.final.name}.lock", f"run folder '{self.final}'", "output", note)

    def failure(self, e: OSError) -> EnvironmentFailure:
        """The one line for a run the machine stopped (disk full, permissions), saying how to go on."""
        what = f"{e.strerror or e} ('{e.filename}')" if e.filename else str(e.strerror or e)
        if self.partial.is_dir():
            return EnvironmentFailure(f"{what}; the partial run is kept in {self.partial}: free space or fix "
                                      "permissions, then rerun with --resume", field="output")
        return EnvironmentFailure(f"{what}; nothing was written: fix permissions or free space there, or choose "
                                  "another --output", field="output")

    def open(self, force: bool, resume: bool) -> bool:
        """Create (or, with resume, reuse) the partial folder; True when resuming."""
        if self.final.exists() and not force:
            raise RecipeError(f"run folder '{self.final}' already exists; pass --force to replace it "
                              "or --output to write elsewhere", field="output")
        if resume and self.partial.is_dir():
            for leftover in [*self.partial.glob(".*"), *self.partial.glob("stages/.*"), *self.partial.glob("stages/*/.*")]:
                remove_tree(leftover)  # temp files of writes a kill interrupted
            return True
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return False

    def stage_dir(self, index: int, label: str) -> Path:
        return self.partial / "stages" / f"{index:02d}-{label}"

    def committed(self, recipe_sha256: str, model_sha256: str) -> dict | None:
        """The partial folder's manifest when the run it records is complete for this recipe and model.
        A complete partial run for other input has dropped its snapshots, so it is no start for this
        one: the folder is emptied."""
        path = self.partial / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            ok = (manifest["recipe"]["sha256"] == recipe_sha256 and manifest["model"]["sha256"] == model_sha256
                  and all(_has(self.partial / a["path"], a["bytes"]) for a in manifest["artifacts"]))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            remove_tree(self.partial)
            self.partial.mkdir()
        return manifest if ok else None

    def begin_stage(self, sdir: Path, replaces: tuple[str, ...], first: bool, keep: bool) -> None:
        """Prepare the folder of a stage about to run, which may replace the top-level entries ``replaces``.
        ``first``: every stage before it was reused, so what it kept when it began last time is still
        what it must start from (a later stage's is stale and goes). ``keep``: an interrupted
        resumable stage keeps its own files too."""
        before = sdir / BEFORE
        if first and before.is_dir():
            self._restore(before)
        else:
            remove_tree(before)
        if sdir.is_dir() and not keep:
            for child in list(sdir.iterdir()):
                if child.name != BEFORE:
                    remove_tree(child)
        sdir.mkdir(parents=True, exist_ok=True)
        if not before.is_dir():
            tmp = sdir / f".{BEFORE}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "files").mkdir(parents=True)
            entries = self._stage_outputs()
            for entry in entries:
                if entry.name in replaces:
                    copy_tree(entry, tmp / "files" / entry.name)
            (tmp / ENTRIES).write_text(json.dumps([e.name for e in entries]))
            tmp.rename(before)

    def _restore(self, before: Path) -> None:
        """Make the top-level stage outputs what they were when ``before`` was kept (idempotent, so a kill
        midway is harmless)."""
        names = set(json.loads((before / ENTRIES).read_text()))
        for entry in self._stage_outputs():
            if entry.name not in names:
                remove_tree(entry)
        for kept in (before / "files").iterdir():
            remove_tree(self.partial / kept.name)
            copy_tree(kept, self.partial / kept.name)

    def _stage_outputs(self) -> list[Path]:
        return sorted(e for e in self.partial.iterdir() if e.name not in RUNNER_OWN and not e.name.startswith("."))

    def _snapshots(self) -> list[Path]:
        return [sdir / name for sdir in (self.partial / "stages").glob("*") for name in (MODEL, BEFORE)]

    def artifacts(self) -> list[dict]:
        """What the manifest lists: every file of the partial folder but the snapshots."""
        return artifacts(self.partial, skip=tuple(self._snapshots()))

    def drop_snapshots(self) -> None:
        """Snapshots only serve --resume; a complete run does not ship them."""
        for snapshot in self._snapshots():
            remove_tree(snapshot)

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


def _has(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size
