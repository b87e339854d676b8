"""`sweep SWEEP.yaml`: many runs of one base recipe, each the ordinary `run`, as Ray tasks or one by one.

Everything is validated first (pipeline/sweep_file.py, then `plan` of every run), so a mistake in the
tenth run fails before the first starts and before the sweep folder exists. A run whose folder holds a
manifest for the same recipe and model (what ``run --resume`` takes as complete) is skipped; an
interrupted one resumes its partial folder. A failed run is recorded with its one-line error and the
others go on; the sweep exits 1 when any failed. Runs share the statistics and dense-model caches
(calibration/cache.py, evaluation/dense.py: atomic writes, built once under an flock).

The sweep folder: ``runs/NAME/`` (each run folder), ``logs/NAME.log`` (what `run` would print),
sweep.json (every run: overrides, status, metrics, speed, size, verdict), sweep.md (one table) and
pareto.png (quality against latency, marker area for bytes, the Pareto front, and the fastest run that
passes the recipe's quality gate ringed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.echo import clip
from core.errors import GateRejected, PipelineError
from core.files import dump, write_atomic

from .sweep_file import Job, Sweep, load_sweep

HEADERS = ["run", "overrides", "status", "quality", "latency ms", "speedup", "size", "gate", "Pareto front", "error"]


@dataclass
class Pending:
    job: Job
    folder: Path
    log: Path


def prepare(path: str | Path, output: str | Path | None = None) -> tuple[Sweep, list[Pending], dict[str, dict]]:
    """The sweep (into ``output`` instead of the file's folder when given), the runs left to do and the records
    of those already complete (planning every run: model, data and targets are checked as ``run`` checks them)."""
    from .runner import plan

    sweep = load_sweep(path)
    if output is not None:
        sweep.output = Path(output).resolve()
    todo, done = [], {}
    for job in sweep.jobs:
        p = plan(job.recipe)
        folder = sweep.output / "runs" / job.name
        if _complete(folder, p.recipe.sha256(), p.source.sha256):
            done[job.name] = {"status": "skipped", "seconds": None, "error": None}
        else:
            todo.append(Pending(job, folder, sweep.output / "logs" / f"{job.name}.log"))
    return sweep, todo, done


def _complete(folder: Path, recipe_sha256: str, model_sha256: str) -> bool:
    """The run folder is finished for this very recipe and model (the test ``run --resume`` applies)."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
        return m["recipe"]["sha256"] == recipe_sha256 and m["model"]["sha256"] == model_sha256
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_one(job: Job, folder: Path, log: Path, threads: int | None = None) -> dict:
    """One run, as `run --resume` (a folder left for another recipe is replaced); its console output goes to
    ``log``. Never raises: a failure is the record's one-line error. Also the body of each Ray task."""
    from rich.console import Console
    from transformers.utils import logging

    from core.events import Events

    from .runner import run

    logging.disable_progress_bar()  # the sweep's bar is the one on the terminal; the log has the rest
    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        events = Events(None, Console(file=f, width=120, force_terminal=False))
        try:
            run(job.recipe, folder, force=folder.exists(), resume=True, events=events)
            error = None
        except GateRejected:  # complete, marked rejected: the sweep reports it and picks among the others
            error = None
        except PipelineError as e:
            error = clip(str(e), 300)
        except Exception as e:  # noqa: BLE001 (a bug in one run must not stop the sweep; its log has the line)
            error = clip(f"{type(e).__name__}: {e}".splitlines()[0], 300)
        if error:
            print(f"error: {error}", file=f)
    seconds = round(time.perf_counter() - t0, 2)
    return {"status": "failed" if error else "done", "seconds": seconds, "error": error}


def sweep(path: str | Path, serial: bool = False, address: str | None = None, num_cpus: int | None = None,
          output: str | Path | None = None) -> int:
    """Run the sweep; 1 when any run failed, else 0."""
    sweep_, todo, records = prepare(path, output)
    out = sweep_.output
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _Progress(len(sweep_.jobs), len(records)) as progress:
        results = _serial(todo) if serial else _ray(todo, sweep_, address, num_cpus)
        for name, record in results:
            records[name] = record
            progress.advance(record["status"])
    wall = round(time.perf_counter() - t0, 2)
    rows = [_row(job, sweep_.output / "runs" / job.name, records[job.name]) for job in sweep_.jobs]
    front = write_outputs(out, rows, wall, "serial" if serial else (address or "local Ray"))
    failed = [r for r in rows if r["status"] == "failed"]
    _say(out, rows, front, failed)
    return 1 if failed else 0


def _serial(todo: list[Pending]) -> Iterator[tuple[str, dict]]:
    for p in todo:
        yield p.job.name, run_one(p.job, p.folder, p.log)


def _ray(todo: list[Pending], sweep_: Sweep, address: str | None, num_cpus: int | None) -> Iterator[tuple[str, dict]]:
    """Each run a Ray task with the sweep's resources; results in the order they finish. Workers import this
    repository (PYTHONPATH) and use this process's cache folder (PIPELINE_CACHE): on a cluster both must
    be the same paths on every node, on shared storage for the cache and the sweep folder."""
    if not todo:
        return
    import ray  # only here: --serial and every other command work without it

    root = str(Path(__file__).resolve().parent.parent)
    from models.loading import cache_dir

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "PIPELINE_CACHE": str(cache_dir().resolve())}
    init: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False}
    if address:
        init["address"] = address
    else:
        init["num_cpus"] = num_cpus or os.cpu_count()
    ray.init(**init)
    try:
        res = sweep_.spec.resources
        task = ray.remote(run_one).options(num_cpus=res.cpus, num_gpus=res.gpus, memory=res.memory, max_retries=0)
        threads = max(1, int(res.cpus))
        refs = {task.remote(p.job, p.folder, p.log, threads): p for p in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            p = refs.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 (the worker died: out of memory, killed, node lost)
                record = {"status": "failed", "seconds": None,
                          "error": clip(f"the Ray task failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}", 300)}
            yield p.job.name, record
    finally:
        ray.shutdown()


def _row(job: Job, folder: Path, record: dict) -> dict:
    """sweep.json's entry for one run: its record and, when it completed, what its manifest measured."""
    row: dict[str, Any] = {"name": job.name, "overrides": job.overrides, **record, "folder": str(folder),
                           "metrics": None, "speed": None, "size": None, "verdict": None}
    if record["status"] == "failed":
        return row
    m = json.loads((folder / "manifest.json").read_text())
    ev = m.get("evaluation") or {}
    row["metrics"] = ev.get("comparison")
    if "latency" in ev:
        lat = ev["latency"]
        row["speed"] = {"median_ms": lat["compressed"]["median_ms"], "dense_median_ms": lat["dense"]["median_ms"],
                        "speedup": lat["speedup"]}
    row["size"] = ev.get("size")
    judged = m.get("verdict")
    row["verdict"] = {"accepted": judged["accepted"], "line": judged["line"]} if judged else None
    return row


def write_outputs(out: Path, rows: list[dict], wall: float, mode: str) -> set[str]:
    """sweep.json, sweep.md and (when any run measured latency) pareto.png; returns the Pareto front's names."""
    from .compare import front_figure, quality_axis, run_row
    from .report import md_table

    measured = [r for r in rows if r["speed"] is not None]
    front: set[str] = set()
    table_rows: dict[str, Any] = {}
    best = None
    if measured:
        manifests = {r["name"]: json.loads((Path(r["folder"]) / "manifest.json").read_text()) for r in measured}
        metric, lower = quality_axis(next(iter(manifests.values()))["model"]["task"], None)
        table_rows = {r["name"]: run_row(Path(r["folder"]), r["name"], manifests[r["name"]], metric) for r in measured}
        passing = [table_rows[r["name"]] for r in measured if (r["verdict"] or {}).get("accepted")]
        best = min(passing, key=lambda x: (x.latency_ms, -x.quality if not lower else x.quality)).name if passing else None
        front = front_figure(list(table_rows.values()), out / "pareto.png", metric, lower, best=best, sized=True)
    summary = {"mode": mode, "wall_seconds": wall, "best": best, "pareto_front": sorted(front), "runs": rows}
    write_atomic(out / "sweep.json", dump(summary))
    shared = _shared(rows)
    lines = []
    for r in rows:
        t = table_rows.get(r["name"])
        lines.append([r["name"], ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items() if k not in shared),
                      r["status"], t.quality if t else None, t.latency_ms if t else None, t.speedup if t else None,
                      t.size if t else None, t.gate if t else None,
                      ("yes" if r["name"] in front else "") + (" (best)" if r["name"] == best else ""), r["error"]])
    every = f"Every run: {', '.join(f'`{k}={json.dumps(v)}`' for k, v in shared.items())}.\n\n" if shared else ""
    plot = "\n\n![quality against latency, marker area: bytes](pareto.png)\n" if measured else "\n"
    write_atomic(out / "sweep.md", f"# Sweep ({mode}, {wall:g} s)\n\n{every}{md_table(HEADERS, lines, limit=1000)}{plot}")
    return front


def _shared(rows: list[dict]) -> dict[str, Any]:
    """Overrides every run has with one value: said once above the table instead of in every row."""
    if len(rows) < 2:
        return {}
    first = rows[0]["overrides"]
    return {k: v for k, v in first.items() if all(k in r["overrides"] and r["overrides"][k] == v for r in rows)}


def _say(out: Path, rows: list[dict], front: set[str], failed: list[dict]) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    print(f"sweep: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; wrote {out}/sweep.md, "
          "sweep.json" + (", pareto.png" if (out / "pareto.png").exists() and any(r["speed"] for r in rows) else ""))
    for r in failed:
        print(f"failed: {r['name']}: {r['error']} (log: {out}/logs/{r['name']}.log)", file=sys.stderr)


class _Progress:
    """A rich bar over the runs, with counts of done, failed and skipped and the time left."""

    def __init__(self, total: int, skipped: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.counts = {"done": 0, "failed": 0, "skipped": skipped}
        self.progress = Progress(TextColumn("[bold]sweep[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr))
        self.task = self.progress.add_task(self._text(), total=total, completed=skipped)

    def _text(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.counts.items())

    def advance(self, status: str) -> None:
        self.counts[status] += 1
        self.progress.update(self.task, advance=1, description=self._text())

    def __enter__(self) -> _Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
