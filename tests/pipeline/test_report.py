"""report.md as a reader sees it: formatted values (never a Python repr), figures beside it, no stale warning."""

from __future__ import annotations

import io
import json
import os
import re
import struct
from pathlib import Path

import onnx
import pytest
from rich.console import Console

from core.events import Events
from evaluation.figures import dense_panels
from export import tensorrt
from pipeline.__main__ import main
from pipeline.console import summary_rows
from pipeline.report import fmt, md_table
from pipeline.runner import run

from ..conftest import text_recipe, write_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FLAP_INT8 = [{"type": "calibrate"},
             {"type": "prune_structured", "method": "flap", "ratio": 0.2, "structure": "UL-UM", "align": 8},
             {"type": "export"}, {"type": "quantize", "format": "int8"}, {"type": "evaluate"}]


@pytest.fixture(scope="module")
def flap_int8_console(bert_dir, tmp_path_factory):
    """The run folder and what the run printed (a recording console, 110 columns)."""
    tmp = tmp_path_factory.mktemp("flap_int8")
    recipe = text_recipe(bert_dir, "feature-extraction", FLAP_INT8, evaluation={"lee": True})
    console = Console(record=True, width=110, file=io.StringIO())
    folder = run(write_recipe(tmp, recipe), output=tmp / "run", events=Events(None, console))
    return folder, console.export_text()


@pytest.fixture(scope="module")
def flap_int8_run(flap_int8_console):
    return flap_int8_console[0]


def test_values_are_formatted_not_reprs():
    assert fmt({"pearson": 0.65381234, "spearman": -0.5}) == "pearson 0.65381, spearman -0.5"
    assert fmt([]) == "none" and fmt([2, 30522]) == "[2, 30522]" and fmt(["a", "b"]) == "a, b"
    assert fmt(1234567) == "1,234,567" and fmt(64) == "64" and fmt(True) == "yes" and fmt(None) == ""
    assert fmt(9.5367431640625e-07) == "9.5367e-07"
    table = md_table(["key", "value"], [["calibration", {"method": "minmax", "shape": [2, 16]}]])
    assert table.splitlines()[-1] == "| calibration | method minmax, shape [2, 16] |"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def test_report_links_its_figures_and_prints_no_repr(flap_int8_run):
    report = (flap_int8_run / "report.md").read_text()
    for png in ("stages/01-prune_structured/kept_per_layer.png", "stages/04-evaluate/against_dense.png"):
        assert f"]({png})" in report
        width, height = _png_size(flap_int8_run / png)
        assert width >= 400 and height >= 300
    assert not re.search(r"[{}]|\[\]|'\w+': ", report), "a dict, list or quoted repr reached report.md"
    lee = next(line for line in report.splitlines() if line.startswith("| lee pearson |"))
    ev = json.loads((flap_int8_run / "manifest.json").read_text())["evaluation"]
    assert lee == f"| lee pearson | {fmt(ev['dense']['lee']['pearson'])} | {fmt(ev['compressed']['lee']['pearson'])} |"


def test_layer_counts_before_and_after_are_recorded(flap_int8_run):
    layers = json.loads((flap_int8_run / "manifest.json").read_text())["stages"][1]["metrics"]["layers"]
    assert [(lay["heads_before"], lay["mlp_channels_before"], lay["mlp_channels"]) for lay in layers] == [(4, 64, 56)] * 2


def test_panels_against_dense_follow_the_evaluation(flap_int8_run):
    ev = json.loads((flap_int8_run / "manifest.json").read_text())["evaluation"]
    panels = dense_panels(ev)
    assert [p.title for p in panels] == ["lee pearson", "lee spearman", "mean_cosine", "min_cosine",
                                         "latency (batch 2)", "ONNX MB"]
    assert panels[2].values == [1.0, ev["comparison"]["mean_cosine"]]
    assert panels[4].values == [ev["latency"]["dense"]["median_ms"], ev["latency"]["compressed"]["median_ms"]]
    assert panels[5].values == [ev["size"]["dense"]["onnx_bytes"] / 1e6, ev["size"]["compressed"]["onnx_bytes"] / 1e6]


def test_no_float32_weights_warning_after_int8(flap_int8_run):
    """The export stage's float graph gets the advice to quantize; the quantized artifact does not."""
    m = json.loads((flap_int8_run / "manifest.json").read_text())
    assert m["onnx"]["tensorrt"]["warnings"] == []
    float_graph = json.loads((flap_int8_run / "stages" / "02-export" / "tensorrt.json").read_text())
    assert any("float32 weights" in w["message"] for w in float_graph["warnings"])
    quantized = tensorrt.check(onnx.load(flap_int8_run / "model.onnx"), "jetson-orin-jp6")
    assert not any("float32 weights" in w.message for w in quantized.warnings)


def test_the_cache_holds_statistics_and_dense_graphs(flap_int8_run):
    """README: statistics in stats/, the dense ONNX evaluate compares with in onnx/, under PIPELINE_CACHE."""
    cache = Path(os.environ["PIPELINE_CACHE"])
    assert list((cache / "stats").glob("*.safetensors")) and list((cache / "onnx").iterdir())


def test_console_ends_with_the_summary_panel(flap_int8_console):
    folder, text = flap_int8_console
    lines = text.rstrip().splitlines()
    verdict = next(i for i, line in enumerate(lines) if line.startswith("verdict: "))
    panel = "\n".join(lines[verdict:])
    ev = json.loads((folder / "manifest.json").read_text())["evaluation"]
    for label in ("quality vs dense", "speed vs dense", "size", "TensorRT", "gate", "artifact"):
        assert f"│ {label} " in panel, label
    assert f"mean_cosine {fmt(ev['comparison']['mean_cosine'])}" in panel and f"{folder}/ (model.onnx)" in panel
    assert lines[-1].startswith("╰") and "no quality gate (set evaluation.accept)" in panel


def test_summary_rows_state_the_gate_and_missing_stages(flap_int8_run):
    m = json.loads((flap_int8_run / "manifest.json").read_text())
    m["verdict"] = {"accepted": False, "line": "", "checks": [
        {"field": "min_mean_cosine", "metric": "mean_cosine", "value": 0.9, "bound": 0.93, "ok": False}]}
    rows = dict(summary_rows(m, flap_int8_run))
    assert rows["gate"] == "REJECTED: mean_cosine 0.9 (>= 0.93 required)"
    assert rows["TensorRT"] == "jetson-orin-jp6 (TensorRT 10.3.0): ready; build the engine on the device with " \
                               "build/build_engine.sh"
    speedup = m["evaluation"]["latency"]["speedup"]
    assert rows["speed vs dense"].startswith(f"{speedup:.2f}x ({'faster' if speedup >= 1 else 'slower'} than dense)")
    assert "threads, ONNX Runtime CPU)" in rows["speed vs dense"]
    m["evaluation"]["latency"]["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "threads, ONNX Runtime CUDA)" in dict(summary_rows(m, flap_int8_run))["speed vs dense"]
    m["evaluation"] = m["verdict"] = m["onnx"] = None
    rows = dict(summary_rows(m, flap_int8_run))
    assert rows["quality vs dense"] == "not evaluated (add '- type: evaluate' last)"
    assert rows["TensorRT"] == "no ONNX graph (add '- type: export')"
    assert rows["gate"] == "no verdict (the run has no evaluate stage)"


def test_long_steps_have_progress_bars(flap_int8_run):
    """export, quantize and evaluate (with its latency loop) each report progress to the end."""
    events = [json.loads(line) for line in (flap_int8_run / "events.jsonl").read_text().splitlines()]
    last = {e["task"]: (e["completed"], e["total"]) for e in events if e["event"] == "progress"}
    for task in ("export", "quantize int8", "evaluate", "latency runs"):
        done, total = last[task]
        assert done == total > 0, task
    # one warm-up and five timed runs of each graph, with the int8 session settings and with ORT's defaults
    assert last["latency runs"][1] == 2 * 2 * (1 + 5)


def test_int8_speed_is_also_stated_for_a_default_session(flap_int8_console):
    """The int8 artifact's sessions switch two ORT optimizers off; a consumer that ignores that sees the other number."""
    folder, text = flap_int8_console
    lat = json.loads((folder / "manifest.json").read_text())["evaluation"]["latency"]
    assert lat["disabled_optimizers"] == ["MatMulAddFusion", "CommonSubexpressionElimination"]
    default = lat["ort_default_settings"]
    assert default["speedup"] == round(default["dense"]["median_ms"] / default["compressed"]["median_ms"], 3)
    report = (folder / "report.md").read_text()
    assert f"| speedup, ONNX Runtime default session |  | {fmt(default['speedup'])} |" in report
    assert f"{default['speedup']:.2f}x in a default ONNX Runtime session" in " ".join(text.split()).replace("│ ", "")


def test_inspect_renders_tables_not_markdown(flap_int8_run, capsys):
    assert main(["inspect", str(flap_int8_run)]) == 0
    out = capsys.readouterr().out
    assert "|---|" not in out and "**" not in out
    assert "┃ metric" in out and "│ lee pearson" in out and "╰" in out
