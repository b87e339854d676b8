"""Figures for run folders and reports (PNG), drawn headless.

matplotlib is imported inside the functions and only through its object API (`Figure` on an Agg
canvas), never `pyplot`: importing this module costs nothing, no global backend is chosen or
changed, and no display is needed, so plots work the same in a terminal, CI or a server process.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import write_atomic

DENSE, COMPRESSED, FRONT, BEST = "#9e9e9e", "#1f77b4", "#d62728", "#2ca02c"


@dataclass(frozen=True)
class Panel:
    """One small bar chart: a bar per label, its value written above it."""

    title: str
    labels: Sequence[str]
    values: Sequence[float]
    unit: str = ""


@dataclass(frozen=True)
class Point:
    """One run on a quality-vs-latency plane."""

    label: str
    x: float
    y: float
    reference: bool = False  # drawn grey (the dense model)
    area: float = 36.0  # marker area in points² (matplotlib's default); a sweep scales it with the artifact's bytes


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


def line_plot(path: Path, x: Sequence[float], series: dict[str, Sequence[float]], title: str,
              xlabel: str, ylabel: str, markers: bool = False) -> None:
    """One line per ``series`` entry (label -> y values over ``x``), written atomically as a PNG;
    ``markers`` for a few measured points (the lines between them are not measurements)."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    for label, y in series.items():
        ax.plot(x, y, label=label, linewidth=1.5, marker="o" if markers else None)
    if all(isinstance(v, int) for v in x):  # steps, token counts: no 2.5 on the axis
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)


def bar_panels(path: Path, panels: Sequence[Panel], title: str) -> None:
    """Side-by-side small bar charts, each on its own scale (perplexity and milliseconds do not share
    an axis); the first bar of every panel is grey (the reference), the others blue."""
    fig = _figure(max(4.0, 2.3 * len(panels)), 3.4)
    fig.suptitle(title)
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        colors = [DENSE] + [COMPRESSED] * (len(panel.values) - 1)
        bars = ax.bar(list(panel.labels), list(panel.values), color=colors)
        ax.bar_label(bars, labels=[f"{v:.5g}{panel.unit}" for v in panel.values], fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        ax.margins(y=0.18)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def grouped_bars(path: Path, categories: Sequence[str], series: dict[str, Sequence[float]], title: str,
                 xlabel: str, ylabel: str, ylim: tuple[float, float] | None = None) -> None:
    """One group of bars per category (a layer, say), one bar per series; long category lists get
    narrow, rotated labels so 36 layers still read."""
    import numpy as np

    n, k = len(categories), len(series)
    fig = _figure(min(14.0, max(6.4, 0.28 * n * k + 1.5)), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / k
    x = np.arange(n)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, list(values), width, label=label)
    crowded = n > 8 and max(map(len, categories)) > 3
    ax.set_xticks(x, list(categories), rotation=90 if crowded else 0, fontsize=7 if n > 8 else 9)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if k > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def front_plot(path: Path, points: Sequence[Point], front: Sequence[Point], title: str, xlabel: str,
               ylabel: str, best: Point | None = None, note: str | None = None) -> None:
    """Every point labelled, the ``front`` (already ordered along x) joined by a red line; ``best`` (a sweep's
    fastest run that passes its quality gate) ringed in green; ``note`` says what marker areas mean."""
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    ax.scatter([p.x for p in points], [p.y for p in points], s=[p.area for p in points],
               color=[DENSE if p.reference else COMPRESSED for p in points], alpha=0.8, zorder=3)
    if front:
        ax.plot([p.x for p in front], [p.y for p in front], color=FRONT, marker="o", fillstyle="none",
                markersize=11, linewidth=1.2, label="Pareto front", zorder=2)
    if best is not None:
        ax.scatter([best.x], [best.y], s=max(best.area, 36.0) * 3, facecolors="none", edgecolors=BEST, linewidths=2,
                   label=f"best passing the gate: {best.label}", zorder=4)
    if front or best is not None:
        ax.legend(fontsize=8)
    for p in points:
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if note:
        ax.text(0.99, 0.01, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color=DENSE)
    ax.ticklabel_format(useOffset=False)  # 0.9999, not "+1" and offsets
    ax.margins(x=0.15, y=0.12)
    ax.grid(alpha=0.3)
    _save(fig, path)
