"""`sweep`: grid expansion and run names, validation before any work, a serial sweep of tiny runs with one
failing (isolated, exit 1), a rerun that skips complete runs, one sweep on local Ray, and the shared caches
under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml

from calibration.cache import StatsCache
from core.lock import flocked
from pipeline.__main__ import main
from pipeline.sweep_file import load_sweep

from ..conftest import text_recipe, write_recipe

STAGES = [{"type": "calibrate"}, {"type": "prune_structured", "method": "magnitude-sp", "ratio": 0.25, "align": 8},
          {"type": "export"}, {"type": "evaluate"}]


@pytest.fixture(scope="module")
def base(bert_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    recipe = text_recipe(bert_dir, "feature-extraction", STAGES, evaluation={"accept": {"min_mean_cosine": 0.5}})
    return write_recipe(folder, recipe, "base.yaml")


def _sweep(base: Path, name: str, **body) -> Path:
    path = base.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"recipe": base.name, "output": f"out-{name}", **body}, sort_keys=False))
    return path


def test_grid_expands_to_every_combination_with_names_from_the_overrides(base):
    path = _sweep(base, "grid", grid={"stages[prune_structured].ratio": [0.25, 0.5],
                                      "stages[1].method": ["magnitude-sp", "wanda-sp"],
                                      "evaluation.latency.iterations": [3]})
    sweep = load_sweep(path)
    assert [j.name for j in sweep.jobs] == [  # a key with one value is in every run: not in the names
        "ratio0.25-methodmagnitude-sp", "ratio0.25-methodwanda-sp", "ratio0.5-methodmagnitude-sp", "ratio0.5-methodwanda-sp"]
    r = sweep.jobs[3].recipe
    assert (r.name, r.stages[1].ratio, r.stages[1].method, r.evaluation.latency.iterations) == (
        "ratio0.5-methodwanda-sp", 0.5, "wanda-sp", 3)
    assert sweep.output == base.parent / "out-grid" and not sweep.output.exists()
    assert r.model.source == sweep.jobs[0].recipe.model.source  # paths resolved against the base recipe's folder


def test_runs_list_names_removed_stages_clashing_keys_and_long_names(base):
    path = _sweep(base, "runs", runs=[{"name": "mine", "stages[1].ratio": 0.5}, {"stages[evaluate]": False},
                                      {"calibration.num_samples": 4, "evaluation.num_samples": 2},
                                      {"export.rtol": 0.001, **{"evaluation.latency.warmup": 2}, "stages[1].align": 16,
                                       "calibration.seed": 123456789, "evaluation.latency.iterations": 99999,
                                       "evaluation.lee": False}])
    jobs = load_sweep(path).jobs
    assert [j.name for j in jobs][:3] == ["mine", "no-evaluate", "calibration.num_samples4-evaluation.num_samples2"]
    assert [s.type for s in jobs[1].recipe.stages] == ["calibrate", "prune_structured", "export"]
    assert len(jobs[3].name) == 60 and jobs[3].name.startswith("rtol0.001-warmup2-align16-seed123456789-iter")
    assert load_sweep(path).jobs[3].name == jobs[3].name  # deterministic
    toggled = _sweep(base, "toggle", grid={"stages[prune_structured]": [False, True]})
    assert [(j.name, len(j.recipe.stages)) for j in load_sweep(toggled).jobs] == [
        ("no-prune_structured", 3), ("prune_structured", 4)]


@pytest.mark.parametrize("body, line", [
    ({"grid": {"stages[1].ratoi": [0.1]}},
     "error: grid.stages[1].ratoi: unknown key 'ratoi' for stage prune_structured; allowed keys: type, name, method, ratio"),
    ({"grid": {"evaluation.latency.iters": [3]}},
     "error: grid.evaluation.latency.iters: unknown key 'iters' for evaluation.latency; allowed keys: "),
    ({"runs": [{"stages[flap].ratio": 0.1}]},
     "error: runs[0].stages[flap].ratio: no stage of the base recipe is labelled 'flap'; use stages[N] or one of: "),
    ({"runs": [{"name": "a", "stages[1].ratio": 0.1}, {"name": "a"}]},
     "error: runs[1]: runs[0] and runs[1] are both named 'a': give the runs different overrides or names"),
    ({"grid": {"stages[1].ratio": [0.1, 2.0]}},
     "error: stages[1].ratio: run 'ratio2.0': 2.0 is out of range: "),
    ({"grid": {"name": ["x"]}}, "error: grid.name: the sweep names each run from its overrides: remove 'name'"),
    ({"grid": {}}, "error: recipe: 'grid' needs at least one key, each with a non-empty list of values"),
    ({"grid": {"stages[1]": [3]}}, "error: stages[1]: 3 is not allowed for a whole stage: true keeps it, false or null "),
])
def test_a_bad_sweep_is_one_line_exit_2_and_no_folder(base, capsys, body, line):
    path = _sweep(base, "bad", **body)
    assert main(["sweep", str(path), "--serial"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not (base.parent / "out-bad").exists()


def test_num_cpus_only_for_a_local_ray(base, capsys):
    path = _sweep(base, "flags", grid={"stages[1].ratio": [0.25]})
    assert main(["sweep", str(path), "--serial", "--num-cpus", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --num-cpus: sets the CPUs of the Ray started here")
    assert not (base.parent / "out-flags").exists()


@pytest.fixture(scope="module")
def serial(base):
    """Three runs, one of which fails in its export (a parity tolerance no graph meets), run twice."""
    path = _sweep(base, "serial", runs=[{"stages[1].ratio": 0.25}, {"stages[1].ratio": 0.5},
                                        {"stages[1].ratio": 0.5, "export.rtol": 1e-12}])
    first = main(["sweep", str(path), "--serial"])
    out = base.parent / "out-serial"
    record = json.loads((out / "sweep.json").read_text())
    record["md"] = (out / "sweep.md").read_text()
    mtime = (out / "runs" / "ratio0.25" / "manifest.json").stat().st_mtime_ns
    second = main(["sweep", str(path), "--serial"])
    return first, record, second, json.loads((out / "sweep.json").read_text()), out, mtime


def test_serial_sweep_records_every_run_and_isolates_the_failure(serial):
    first, record, _, _, out, _ = serial
    assert first == 1
    runs = {r["name"]: r for r in record["runs"]}
    assert list(runs) == ["ratio0.25", "ratio0.5", "ratio0.5-rtol1e-12"]
    assert [r["status"] for r in runs.values()] == ["done", "done", "failed"]
    bad = runs["ratio0.5-rtol1e-12"]
    assert bad["error"].startswith("export") and "\n" not in bad["error"] and bad["metrics"] is None
    assert "error: " + bad["error"] in (out / "logs" / "ratio0.5-rtol1e-12.log").read_text()
    for name in ("ratio0.25", "ratio0.5"):
        m = json.loads((out / "runs" / name / "manifest.json").read_text())
        r = runs[name]
        assert r["overrides"] == {"stages[1].ratio": float(name[5:])}
        assert r["metrics"]["mean_cosine"] == m["evaluation"]["comparison"]["mean_cosine"]
        assert r["speed"]["median_ms"] == m["evaluation"]["latency"]["compressed"]["median_ms"]
        assert r["size"]["compressed"]["onnx_bytes"] == m["evaluation"]["size"]["compressed"]["onnx_bytes"]
        assert r["verdict"]["accepted"] is m["verdict"]["accepted"]
    accepted = [n for n, r in runs.items() if r["verdict"] and r["verdict"]["accepted"]]
    fastest = min(accepted, key=lambda n: runs[n]["speed"]["median_ms"]) if accepted else None
    assert record["best"] == fastest and record["mode"] == "serial"
    assert set(record["pareto_front"]) <= {"ratio0.25", "ratio0.5", "dense"} and record["pareto_front"]
    md = record["md"]
    rows = [line for line in md.splitlines() if line.startswith("| ratio")]
    assert [row.split(" | ")[1:3] for row in rows] == [["stages[1].ratio=0.25", "done"], ["stages[1].ratio=0.5", "done"],
                                                       ["stages[1].ratio=0.5, export.rtol=1e-12", "failed"]]
    assert "![quality against latency, marker area: bytes](pareto.png)" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:4] == b"\x89PNG" and struct.unpack(">II", png[16:24]) == (640, 440)


def test_a_rerun_skips_complete_runs_and_retries_the_failed_one(serial):
    _, _, second, record, out, mtime = serial
    assert second == 1
    assert [r["status"] for r in record["runs"]] == ["skipped", "skipped", "failed"]
    assert (out / "runs" / "ratio0.25" / "manifest.json").stat().st_mtime_ns == mtime  # not run again
    assert record["runs"][0]["metrics"] is not None  # a skipped run still reports its numbers


@pytest.mark.ray
def test_local_ray_runs_the_sweep_as_tasks(base, capsys):
    pytest.importorskip("ray")
    path = _sweep(base, "ray", grid={"stages[1].ratio": [0.25, 0.5]}, resources={"cpus": 1, "memory": "1GiB"})
    assert main(["sweep", str(path), "--num-cpus", "2"]) == 0
    record = json.loads((base.parent / "out-ray" / "sweep.json").read_text())
    assert record["mode"] == "local Ray" and [r["status"] for r in record["runs"]] == ["done", "done"]
    assert all(r["metrics"]["mean_cosine"] > 0 for r in record["runs"])
    assert "sweep: 2 done, 0 skipped, 0 failed" in capsys.readouterr().out


def test_the_readme_sweep_is_recipes_sweep_minilm_verbatim_and_loads():
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    block = readme[readme.index("\n## Sweeps\n"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (root / "recipes" / "sweep-minilm.yaml").read_text()
    jobs = load_sweep(root / "recipes" / "sweep-minilm.yaml").jobs
    assert len(jobs) == 12 and jobs[0].name == "ratio0.2-no-distill-no-quantize"
    assert [s.type for s in jobs[0].recipe.stages] == ["calibrate", "prune_structured", "export", "evaluate"]


def _writer(root: str, seed: int, rounds: int) -> None:
    torch.set_num_threads(1)
    cache = StatsCache(Path(root))
    for _ in range(rounds):
        cache.save("k" * 64, {"layer": {"sum": torch.full((256, 256), float(seed)), "count": torch.tensor(seed)}})


def test_concurrent_cache_writers_leave_one_whole_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # a forked child of a process that ran torch may hang in its threads
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), seed, 40)) for seed in (1, 2, 3)]
    for p in procs:
        p.start()
    cache, seen = StatsCache(tmp_path), set()
    while any(p.is_alive() for p in procs):
        got = cache.load("k" * 64)
        if got is not None:  # never a mix of two writers' tensors, never a torn file
            seed = int(got["layer"]["count"])
            assert torch.equal(got["layer"]["sum"], torch.full((256, 256), float(seed)))
            seen.add(seed)
    assert all(p.exitcode == 0 for p in procs)
    assert int(cache.load("k" * 64)["layer"]["count"]) in (1, 2, 3)
    assert [p.name for p in (tmp_path / "stats").iterdir()] == [f"{'k' * 32}.safetensors"]  # no temp file left


def _builder(path: str, log: str) -> None:
    target = Path(path)
    with flocked(target):
        if not target.exists():
            with open(log, "a") as f:
                f.write("built\n")
            time.sleep(0.2)
            target.write_text("dense")


def test_flocked_builds_a_shared_reference_once(tmp_path):
    target, log = tmp_path / "dense.onnx", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_builder, args=(str(target), str(log))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert log.read_text() == "built\n" and target.read_text() == "dense"
    assert (tmp_path / ".dense.onnx.flock").is_file()
