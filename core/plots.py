"""Figures for run folders and reports (PNG), drawn headless.

matplotlib is imported inside the function and only through its object API (`Figure` on an Agg
canvas), never `pyplot`: importing this module costs nothing, no global backend is chosen or
changed, and no display is needed, so plots work the same in a terminal, CI or a server process.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from .files import write_atomic


def line_plot(path: Path, x: Sequence[float], series: dict[str, Sequence[float]], title: str,
              xlabel: str, ylabel: str) -> None:
    """One line per ``series`` entry (label -> y values over ``x``), written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, y in series.items():
        ax.plot(x, y, label=label, linewidth=1.5)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
