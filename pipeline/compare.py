"""`compare RUN_A RUN_B ...`: finished runs side by side, to pick an operating point.

One table (quality, speed and size against dense, the gate) and one quality-vs-latency plot with the
Pareto front marked: the runs no other run beats on both axes. Quality is the task's first gateable
metric (``Task.accept_metrics``: mean cosine for encoders, perplexity ratio for causal LMs, top-1
agreement for classifiers) unless ``--metric`` names another comparison metric; every one of them is
1 for the dense model, which is drawn as its own point when all runs share the model (its latency
the median of the runs' dense measurements). Latency is each run's own ONNX Runtime measurement, so
runs measured on different machines or under different load do not compare; the table says the threads.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from core.errors import RecipeError
from core.files import write_atomic
from core.plots import Point, front_plot

from .report import fmt, md_table

HEADERS = ["run", "stages", "quality", "latency ms", "speedup", "size", "gate", "Pareto front"]


@dataclass(frozen=True)
class Row:
    name: str
    stages: str
    quality: float
    latency_ms: float
    dense_ms: float
    speedup: float
    size: str
    gate: str
    model: str
    bytes: int | None  # the compressed ONNX file(s); None when the size is counted in parameters


def compare(runs: list[Path], out: Path | None, metric: str | None = None) -> tuple[list[list], Path, str]:
    """The table's rows, the plot's path and the metric compared (``--out`` also gets compare.md)."""
    manifests = [_manifest(r) for r in runs]
    tasks = {m["model"]["task"] for m in manifests}
    if len(tasks) > 1:
        raise RecipeError(f"the runs are of different tasks ({', '.join(sorted(tasks))}); compare runs of one task",
                          field="runs")
    metric, lower = quality_axis(tasks.pop(), metric)
    names = [r.name for r in runs]
    names = names if len(set(names)) == len(names) else [str(r) for r in runs]  # runs/a/x and runs/b/x: the paths
    rows = [run_row(r, name, m, metric) for r, name, m in zip(runs, names, manifests)]
    folder = out or Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    plot = folder / "compare.png"
    on_front = front_figure(rows, plot, metric, lower)
    table = [[r.name, r.stages, r.quality, r.latency_ms, r.speedup, r.size, r.gate,
              "yes" if r.name in on_front else ""] for r in rows]
    if out is not None:
        write_atomic(out / "compare.md", f"# Runs compared on {metric} ({_better(lower)} is better)\n\n"
                     f"{md_table(HEADERS, table)}\n\n![{metric} against latency](compare.png)\n")
    return table, plot, metric


def quality_axis(task: str, metric: str | None) -> tuple[str, bool]:
    """The metric on the quality axis (the task's first gateable one unless ``metric`` names another) and
    whether lower is better for it (a "max_" gate bounds it)."""
    from tasks import TASKS  # only once the folders are known to be runs: it imports torch

    accept = TASKS[task].accept_metrics
    metric = metric or next(iter(accept.values()))
    return metric, any(field.startswith("max_") and m == metric for field, m in accept.items())


def front_figure(rows: list[Row], plot: Path, metric: str, lower: bool, best: str | None = None,
                 sized: bool = False) -> set[str]:
    """Draw quality against latency with the Pareto front, the dense model as its own point when every row
    shares the model; ``best`` names a row to ring (a sweep's pick); ``sized``: marker areas follow each
    row's compressed bytes (a third axis for a sweep's many runs). Returns the names on the front."""
    sizes = [r.bytes for r in rows if r.bytes]
    span = (min(sizes), max(sizes)) if sized and sizes else None
    points = [Point(r.name, r.latency_ms, r.quality, area=_area(r.bytes, span)) for r in rows]
    if len({r.model for r in rows}) == 1:
        points.append(Point("dense", statistics.median(r.dense_ms for r in rows), 1.0, reference=True))
    front = pareto(points, lower)
    chosen = next((p for p in points if p.label == best), None)
    note = f"marker area: compressed ONNX bytes, {span[0] / 1e6:.1f} to {span[1] / 1e6:.1f} MB" if span else None
    front_plot(plot, points, front, f"{metric} against latency", "median latency (ms, ONNX Runtime)",
               f"{metric} (dense = 1, {_better(lower)} is better)", best=chosen, note=note)
    return {p.label for p in front}


def _area(size: int | None, span: tuple[int, int] | None) -> float:
    """Marker area from the smallest artifact of the sweep (40 points²) to the largest (300): the span the note
    states, so a few MB between runs still show."""
    if not size or span is None:
        return 36.0
    low, high = span
    return 40.0 + 260.0 * (size - low) / (high - low) if high > low else 120.0


def _better(lower: bool) -> str:
    return "lower" if lower else "higher"


def pareto(points: list[Point], lower_is_better: bool) -> list[Point]:
    """The points no other point beats on both axes (less latency, better quality), in latency order."""
    def better_or_equal(a: Point, b: Point) -> bool:
        return a.x <= b.x and (a.y <= b.y if lower_is_better else a.y >= b.y)

    front = [p for p in points if not any(better_or_equal(q, p) and (q.x, q.y) != (p.x, p.y) for q in points)]
    return sorted(front, key=lambda p: p.x)


def _manifest(run: Path) -> dict:
    path = run / "manifest.json"
    if not path.is_file():
        raise RecipeError(f"no manifest.json in '{run}' (is it a finished run folder?)", field="runs")
    return json.loads(path.read_text())


def run_row(run: Path, name: str, m: dict, metric: str) -> Row:
    ev = m.get("evaluation") or {}
    if "latency" not in ev:
        raise RecipeError(f"'{run}' has no latency measurement: compare needs runs with an export and an evaluate "
                          "stage", field="runs")
    comparison = ev.get("comparison", {})
    if metric not in comparison or metric == "samples":
        able = ", ".join(k for k in comparison if k != "samples")
        raise RecipeError(f"'{run}' has no {metric!r}; its comparison metrics: {able}", field="--metric")
    lat, size = ev["latency"], ev["size"]
    c = size["compressed"].get("onnx_bytes")
    if c is not None:
        shown = f"{c / 1e6:.1f} MB (x{c / size['dense']['onnx_bytes']:.2f})"
    else:
        shown = f"{size['compressed']['params'] / 1e6:.2f} M params"
    judged = m.get("verdict") or {}
    gate = {True: "ACCEPTED", False: "REJECTED"}.get(judged.get("accepted"), "no gate")
    return Row(name, " → ".join(filter(None, map(_stage, m["stages"]))), comparison[metric],
               lat["compressed"]["median_ms"], lat["dense"]["median_ms"], lat["speedup"], shown, gate,
               m["model"]["sha256"], c)


def _stage(stage: dict) -> str:
    """A stage as few words: its type and the settings that tell runs apart (prune_structured flap 0.5,
    quantize int8); empty for stages without such settings (calibrate, export, evaluate)."""
    p = stage["params"]
    words = [str(p[k]) for k in ("method", "format", "pattern", "ratio", "sparsity", "keep", "steps") if p.get(k)]
    return " ".join([stage["type"], *words]) if words else ""


def print_table(rows: list[list], metric: str, plot: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"quality = {metric}; latency: each run's own ONNX Runtime measurement", title_justify="left",
                  header_style="bold")
    for h in HEADERS:
        table.add_column(h, overflow="fold", justify="right" if h in ("quality", "latency ms", "speedup") else "left")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    console = Console()
    console.print(table)
    console.print(f"wrote {plot}", highlight=False, soft_wrap=True)
