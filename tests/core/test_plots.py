"""core/plots.py: a real PNG written atomically, headless, without importing pyplot or choosing a
global matplotlib backend (checked in a fresh interpreter with no display)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SCRIPT = """
import sys
from pathlib import Path
import core.plots
assert "matplotlib" not in sys.modules, "importing core.plots imported matplotlib"
core.plots.line_plot(Path(sys.argv[1]), [1, 2, 3], {"loss": [0.5, 0.3, 0.2], "other": [0.4, 0.4, 0.1]},
                     "title", "step", "loss")
assert "matplotlib.pyplot" not in sys.modules, "pyplot (global backend state) was imported"
"""


def test_line_plot_writes_a_png_headless_without_pyplot(tmp_path):
    path = tmp_path / "curve.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (640, 360)  # figsize 6.4 x 3.6 in at 100 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # the temp file was renamed, not left


def test_bar_panels_give_each_metric_its_own_scale(tmp_path):
    """One panel per metric, 230 px each: perplexity and milliseconds never share an axis."""
    from core.plots import Panel, bar_panels

    path = tmp_path / "panels.png"
    bar_panels(path, [Panel("perplexity", ["dense", "compressed"], [22.4, 28.5]),
                      Panel("latency", ["dense", "compressed"], [12.0, 8.0], " ms"),
                      Panel("MB", ["dense", "compressed"], [90.9, 65.5])], "against dense")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and struct.unpack(">II", data[16:24]) == (690, 340)
