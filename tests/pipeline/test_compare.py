"""`compare` on three tiny runs: one table, one quality-vs-latency plot with the Pareto front marked."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from core.plots import Point
from pipeline.__main__ import main
from pipeline.compare import pareto
from pipeline.runner import run

from ..conftest import text_recipe, write_recipe

SETTINGS = {"mag25": ("magnitude-sp", 0.25), "mag50": ("magnitude-sp", 0.5), "wsp50": ("wanda-sp", 0.5)}


@pytest.fixture(scope="module")
def three_runs(bert_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    out = []
    for name, (method, ratio) in SETTINGS.items():
        stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": method, "ratio": ratio, "align": 8},
                  {"type": "export"}, {"type": "evaluate"}]
        out.append(run(write_recipe(tmp, text_recipe(bert_dir, "feature-extraction", stages), f"{name}.yaml"),
                       output=tmp / name))
    return out


def test_pareto_front_keeps_the_points_nothing_beats():
    pts = [Point("a", 1.0, 0.90), Point("b", 2.0, 0.95), Point("c", 3.0, 0.93), Point("d", 1.5, 0.89),
           Point("dense", 4.0, 1.0)]
    assert [p.label for p in pareto(pts, lower_is_better=False)] == ["a", "b", "dense"]
    ratios = [Point("a", 1.0, 1.3), Point("b", 2.0, 1.1), Point("c", 3.0, 1.2)]  # perplexity ratio: lower is better
    assert [p.label for p in pareto(ratios, lower_is_better=True)] == ["a", "b"]


def test_compare_writes_one_table_and_one_plot(three_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, three_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(f"│ {name}" in printed for name in SETTINGS) and f"wrote {out / 'compare.png'}" in printed
    png = (out / "compare.png").read_bytes()
    assert png[:4] == b"\x89PNG" and struct.unpack(">II", png[16:24]) == (640, 440)
    md = (out / "compare.md").read_text()
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith(("| mag", "| wsp"))]
    assert [r[0] for r in rows] == ["| mag25", "| mag50", "| wsp50"]
    manifests = [json.loads((r / "manifest.json").read_text())["evaluation"] for r in three_runs]
    points = [Point(n, ev["latency"]["compressed"]["median_ms"], ev["comparison"]["mean_cosine"])
              for n, ev in zip(SETTINGS, manifests)]
    dense_ms = sorted(ev["latency"]["dense"]["median_ms"] for ev in manifests)[1]
    front = {p.label for p in pareto([*points, Point("dense", dense_ms, 1.0)], lower_is_better=False)}
    assert [r[-1].strip(" |") == "yes" for r in rows] == [n in front for n in SETTINGS]
    assert "prune_structured magnitude-sp 0.25" in rows[0][1] and "export" not in rows[0][1]
    assert "![mean_cosine against latency](compare.png)" in md


def test_compare_defaults_to_compare_png_here_and_takes_another_metric(three_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *map(str, three_runs[:2]), "--metric", "min_cosine"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png"]
    assert "quality = min_cosine" in capsys.readouterr().out


def test_compare_refuses_what_it_cannot_compare(three_runs, tmp_path, capsys):
    assert main(["compare", str(three_runs[0])]) == 2
    assert main(["compare", *map(str, three_runs[:2]), "--metric", "perplexity_ratio"]) == 2
    unevaluated = tmp_path / "unevaluated"
    shutil.copytree(three_runs[0], unevaluated)
    m = json.loads((unevaluated / "manifest.json").read_text())
    (unevaluated / "manifest.json").write_text(json.dumps({**m, "evaluation": None}))
    assert main(["compare", str(three_runs[0]), str(unevaluated)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: runs: give two or more run folders to compare"
    assert err[1].startswith("error: --metric: ") and "has no 'perplexity_ratio'; its comparison metrics: mean_cosine, " \
                                                       "min_cosine" in err[1]
    assert err[2] == (f"error: runs: '{unevaluated}' has no latency measurement: compare needs runs with an export "
                      "and an evaluate stage")
    assert not (tmp_path / "compare.png").exists()


def test_runs_with_one_folder_name_are_told_apart_by_path(three_runs, tmp_path):
    from pipeline.compare import compare

    twin = tmp_path / "elsewhere" / three_runs[0].name
    shutil.copytree(three_runs[0], twin)
    rows, _, _ = compare([three_runs[0], twin], tmp_path / "out")
    assert [r[0] for r in rows] == [str(three_runs[0]), str(twin)]
