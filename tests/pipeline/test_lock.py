"""One run per output folder: a second run refuses in one line and leaves the first's partial folder
alone; a lock left by a killed run is taken over, saying so; one from another host is refused."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

import pipeline.runner
from pipeline.runner import run

from ..conftest import text_recipe, write_recipe
from ..test_hostile_input import assert_one_line, cli

STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"}, {"type": "export"}]


@pytest.fixture(scope="module")
def recipe(bert_dir, tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("lock"), text_recipe(bert_dir, "feature-extraction", STAGES))


def _first_run(recipe: Path, out: Path, ready: Path, go: Path) -> None:
    """Run, pausing after the pruning stage's record until ``go`` exists (``ready`` says it is paused)."""
    torch.set_num_threads(1)
    original = pipeline.runner.write_atomic

    def write(path: Path, data) -> None:
        original(path, data)
        if path.as_posix().endswith("01-prune_weights/result.json"):
            ready.touch()
            while not go.exists():
                time.sleep(0.05)
    pipeline.runner.write_atomic = write
    try:
        run(recipe, output=out)
        os._exit(0)
    finally:
        os._exit(3)


def _wait_for(path: Path, child) -> None:
    while not path.exists():
        assert child.is_alive(), "the first run ended before pausing"
        time.sleep(0.05)


def test_a_second_run_on_the_same_output_refuses_and_keeps_the_first_ones_folder(recipe, tmp_path):
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    first = multiprocessing.get_context("fork").Process(target=_first_run, args=(recipe, out, ready, go))
    first.start()
    try:
        _wait_for(ready, first)
        record = tmp_path / ".out.partial" / "stages" / "01-prune_weights" / "result.json"
        kept = record.read_bytes()
        for extra in ([], ["--force"], ["--resume"]):
            code, _, err = cli("run", str(recipe), "--output", str(out), *extra)
            line = assert_one_line(code, err, 1)
            assert f"is being written by process {first.pid} on {socket.gethostname()}" in line
            assert record.read_bytes() == kept
    finally:
        go.touch()
        first.join()
    assert first.exitcode == 0
    assert json.loads((out / "manifest.json").read_text())["stages"][1]["status"] == "ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out", "ready"]  # no lock, no partial folder left


def test_a_stale_lock_is_taken_over_and_a_foreign_one_refused(recipe, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code, _, err = cli("run", str(recipe), "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert f"took over the lock of process {dead.pid}, which is no longer running" in err
    assert not lock.exists() and (tmp_path / "out" / "manifest.json").is_file()

    lock = tmp_path / ".out2.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere.example"}))
    code, _, err = cli("run", str(recipe), "--output", str(tmp_path / "out2"))
    line = assert_one_line(code, err, 1)
    assert line.endswith(f"being written by process {os.getpid()} on elsewhere.example; wait for it to finish, "
                         f"or delete {lock} if that process is gone")
    assert not (tmp_path / ".out2.partial").exists()
