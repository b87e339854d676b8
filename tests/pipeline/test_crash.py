"""kill -9 at stage boundaries and inside the final writes, then ``--resume``: the same artifacts as a
run never interrupted.

Each kill is a real SIGKILL of a forked child running the pipeline, which it sends itself at the
chosen moment: the child wraps one of the writes every run makes (the runner's atomic writes, a
file replaced, the final rename) and kills itself just before or after the one that marks the
moment. The resume runs in this process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import pipeline.runner
from pipeline.runner import run

from ..conftest import text_recipe, write_recipe

STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"},
          {"type": "export"}, {"type": "quantize", "format": "fp16"}]
# Files that record timings (seconds, dates, polygraphy's runner names), so differ between any two runs
TIMED = ("events.jsonl", "report.md", "result.json", "onnx.json", "onnxrt_outputs.json")


@pytest.fixture(scope="module")
def recipe(bert_dir, tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("crash"), text_recipe(bert_dir, "feature-extraction", STAGES))


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> dict:
    out = run(recipe, output=tmp_path_factory.mktemp("crash_ref") / "out")
    return json.loads((out / "manifest.json").read_text())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after_write(name: str):
    """Kill right after the runner's atomic write of a file whose path ends with ``name``."""
    original = pipeline.runner.write_atomic

    def write(path: Path, data) -> None:
        original(path, data)
        if path.as_posix().endswith(name):
            _die()
    pipeline.runner.write_atomic = write


def _before_write(name: str):
    original = pipeline.runner.write_atomic

    def write(path: Path, data) -> None:
        if path.as_posix().endswith(name):
            _die()
        original(path, data)
    pipeline.runner.write_atomic = write


def _after_quantize_places_graph():
    """Kill once the quantize stage has replaced the run's model.onnx (its build/ and record not yet written)."""
    original = Path.replace

    def replace(self: Path, target):
        done = original(self, target)
        target = Path(target)
        if target.name == "model.onnx" and (target.parent / "stages" / "03-quantize").is_dir():
            _die()
        return done
    Path.replace = replace  # type: ignore[method-assign]


def _while_dropping_snapshots():
    """Kill as the first stage snapshot is being deleted, manifest.json written."""
    original = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        partial = next((p for p in path.parents if p.name.endswith(".partial")), None)
        if partial is not None and (partial / "manifest.json").is_file() and "stages" in path.parts and path.exists():
            original(path, *args, **kwargs)
            _die()
        return original(path, *args, **kwargs)
    shutil.rmtree = rmtree


def _before_final_rename():
    original = Path.rename

    def rename(self: Path, target):
        if self.name.endswith(".partial"):
            _die()
        return original(self, target)
    Path.rename = rename  # type: ignore[method-assign]


POINTS = {
    "after prune_weights' record": (lambda: _after_write("01-prune_weights/result.json"), "resumed resumed ran ran"),
    "after export's record": (lambda: _after_write("02-export/result.json"), "resumed resumed resumed ran"),
    "quantize: model.onnx replaced, build/ not yet": (_after_quantize_places_graph, "resumed resumed resumed ran"),
    "quantize: files written, record not yet": (lambda: _before_write("03-quantize/result.json"),
                                                "resumed resumed resumed ran"),
    "finalisation: report written, manifest not yet": (lambda: _before_write("/manifest.json"),
                                                       "resumed resumed resumed resumed"),
    "finalisation: manifest written, dropping the snapshots": (_while_dropping_snapshots, "ran ran ran ran"),
    "finalisation: before the final rename": (_before_final_rename, "ran ran ran ran"),
}


def _child(recipe: Path, out: Path, point: str) -> None:
    torch.set_num_threads(1)
    POINTS[point][0]()
    try:
        run(recipe, output=out)
    finally:
        os._exit(3)  # reached only when the kill did not happen


def _comparable(manifest: dict) -> dict[str, str]:
    return {a["path"]: "timed" if a["path"].endswith(TIMED) else a["sha256"] for a in manifest["artifacts"]}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_9_then_resume_gives_the_same_artifacts(point, recipe, reference, tmp_path):
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_child, args=(recipe, out, point))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()

    manifest = json.loads((run(recipe, output=out, resume=True) / "manifest.json").read_text())
    assert _comparable(manifest) == _comparable(reference)
    assert " ".join(s["status"] for s in manifest["stages"]) == POINTS[point][1]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [a["path"] for a in manifest["artifacts"]] + ["manifest.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _gguf_child(recipe: Path, out: Path) -> None:
    """Kill with the GGUF file's header and metadata written and its tensors not."""
    import gguf

    torch.set_num_threads(1)
    gguf.GGUFWriter.write_tensors_to_file = lambda *a, **k: _die()  # type: ignore[method-assign]
    try:
        run(recipe, output=out)
    finally:
        os._exit(3)


def test_kill_9_inside_the_gguf_write_then_resume(bpe_llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "export_gguf", "formats": ["q8_0"]}]
    recipe = write_recipe(tmp_path, text_recipe(bpe_llama_dir, "causal-lm", stages))
    reference = json.loads((run(recipe, output=tmp_path / "ref") / "manifest.json").read_text())
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_gguf_child, args=(recipe, out))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert (tmp_path / ".out.partial" / "model-q8_0.gguf").is_file() and not out.exists()  # the torn file

    manifest = json.loads((run(recipe, output=out, resume=True) / "manifest.json").read_text())
    assert " ".join(s["status"] for s in manifest["stages"]) == "resumed ran"
    assert _comparable(manifest) == _comparable(reference)


def test_a_complete_partial_run_resumed_with_another_recipe_starts_over(bert_dir, tmp_path):
    """Its snapshots are gone (only the rename was left), so nothing in it may be reused: here the
    quantize stage would otherwise start from the graph it had already quantized."""
    stages = [{"type": "export"}, {"type": "quantize", "format": "fp16"}]
    first = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages), "first.yaml")
    stages[1]["rtol"] = 0.05
    second = write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages), "second.yaml")
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_child, args=(first, out, "finalisation: before the final rename"))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL and (tmp_path / ".out.partial" / "manifest.json").is_file()
    manifest = json.loads((run(second, output=out, resume=True) / "manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["ran", "ran"]
    assert manifest["stages"][1]["params"]["rtol"] == 0.05
