"""The run's device (recipe ``device:``, ``run --device``) and evaluate's ONNX Runtime providers
(``evaluation.runtime``): parsing and precedence, the one-line errors on a machine without the GPU or
the provider asked for, ``auto`` on a CPU machine, the providers handed to ONNX Runtime, and a CPU run
whose files are byte for byte those of the code before the setting existed. The CUDA runs at the end
are skipped without a GPU (bench/gpu_check.py runs them on one)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from calibration.cache import StatsCache
from core.errors import EnvironmentFailure, RecipeError
from evaluation.runner import Runner
from export import onnx as onnx_export
from pipeline.__main__ import main
from pipeline.recipe import parse_recipe, with_device
from pipeline.runner import plan, run

from ..conftest import text_recipe, write_recipe

STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4"},
          {"type": "distill", "steps": 3, "batch_size": 4, "checkpoint_every": 2}, {"type": "export"}]
EVALUATED = [*STAGES, {"type": "evaluate"}]
# The sha256 of the files of `_run(STAGES)` from the folder FIXED with the code before the device setting existed
# (commit 124f799, torch 2.13.0, onnxruntime 1.31.1): the checkpoint, the preprocessor, the golden inputs, the
# distillation loss curve and the ONNX graph. Not compared: files with timings (events, results, report), ONNX
# Runtime's golden outputs (not bit-stable across runs), the exporter's metadata (it names the Python files
# the graph was traced through, so the checkout's path), the config's `transformers_version`, and recipe.yaml,
# which lost distill's `device: auto`.
BEFORE = json.loads((Path(__file__).parent / "data" / "cpu_run_before_device.json").read_text())
FIXED = Path("/tmp/edgeprune-test-device")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.py)")


def _recipe(bert_dir, stages=STAGES, **top) -> dict:
    return {**text_recipe(bert_dir, "feature-extraction", stages), **top}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:1", "auto"])
def test_device_values_parse(bert_dir, value):
    assert parse_recipe(_recipe(bert_dir, device=value)).device == value


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CUDA", 0])
def test_a_bad_device_is_one_recipe_error_naming_the_field(bert_dir, value):
    with pytest.raises(RecipeError) as e:
        parse_recipe(_recipe(bert_dir, device=value))
    assert e.value.field == "device" and "use cpu, cuda, cuda:N (a GPU index) or auto" in e.value.message


def test_the_flag_overrides_the_recipe_and_is_checked_like_it(bert_dir):
    recipe = parse_recipe(_recipe(bert_dir, device="cuda"))
    assert with_device(recipe, "cpu").device == "cpu"
    assert with_device(recipe, None).device == "cuda"  # no flag: the recipe's
    with pytest.raises(RecipeError) as e:
        with_device(recipe, "tpu")
    assert e.value.field == "--device" and "'tpu' is not allowed: use cpu, cuda" in e.value.message


def test_cuda_without_a_gpu_fails_the_plan_with_one_line(bert_dir, no_gpu):
    for value in ("cuda", "cuda:0"):
        with pytest.raises(EnvironmentFailure) as e:
            plan(parse_recipe(_recipe(bert_dir, device=value)))
        assert e.value.field == "device" and e.value.exit_code == 1
        assert f"'{value}' asked for, but torch sees no CUDA GPU here" in e.value.message
        assert "use device: cpu (or run --device cpu)" in e.value.message


def test_a_gpu_index_beyond_the_machine_fails_the_plan(bert_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EnvironmentFailure) as e:
        plan(parse_recipe(_recipe(bert_dir, device="cuda:3")))
    assert e.value.field == "device" and "torch sees 1 CUDA GPU(s), cuda:0 to cuda:0" in e.value.message


def test_the_command_line_prints_one_line_and_exits_1_before_any_folder(bert_dir, tmp_path, no_gpu, capsys):
    path = write_recipe(tmp_path, _recipe(bert_dir))
    out = tmp_path / "out"
    assert main(["run", str(path), "--device", "cuda", "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: device: 'cuda' asked for, but torch sees no CUDA GPU here")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert main(["run", str(path), "--device", "gpu", "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --device: 'gpu' is not allowed")


def test_auto_resolves_to_cpu_without_a_gpu_and_the_saved_recipe_says_so(bert_dir, no_gpu):
    p = plan(parse_recipe(_recipe(bert_dir, device="auto")))
    assert p.device == torch.device("cpu") and p.recipe.device == "cpu"
    assert p.recipe.to_yaml() == plan(parse_recipe(_recipe(bert_dir))).recipe.to_yaml()


def test_cpu_settings_leave_the_recipe_and_fingerprints_as_they_were(bert_dir):
    plain = parse_recipe(_recipe(bert_dir))
    explicit = parse_recipe({**_recipe(bert_dir, device="cpu"), "evaluation": {**_recipe(bert_dir)["evaluation"],
                                                                               "runtime": "cpu"}})
    keys = {"model", "calibration", "device", "evaluation"}
    assert "device" not in plain.dump() and "runtime" not in plain.dump()["evaluation"]
    assert explicit.sha256() == plain.sha256() and explicit.dump(keys) == plain.dump(keys)
    gpu = parse_recipe({**_recipe(bert_dir, device="cuda"), "evaluation": {"runtime": "cuda"}})
    assert gpu.dump(keys)["device"] == "cuda" and gpu.dump(keys)["evaluation"]["runtime"] == "cuda"


def test_statistics_of_a_gpu_run_are_never_reused_for_a_cpu_run(tmp_path):
    stats = {"layer": {"sum_sq": torch.arange(4.0), "tokens": torch.tensor(8)}}
    cpu, cuda = StatsCache(tmp_path), StatsCache(tmp_path, torch.device("cuda"))
    cpu.save("k" * 64, stats)
    assert cuda.load("k" * 64) is None  # another folder: stats-cuda/
    assert torch.equal(cpu.load("k" * 64)["layer"]["sum_sq"], torch.arange(4.0))
    assert list(tmp_path.iterdir()) == [tmp_path / "stats"]


def test_a_runtime_onnxruntime_lacks_fails_the_plan_with_the_extra_to_install(bert_dir, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for runtime, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        recipe = _recipe(bert_dir, EVALUATED)
        recipe["evaluation"] = {**recipe["evaluation"], "runtime": runtime}
        with pytest.raises(EnvironmentFailure) as e:
            plan(parse_recipe(recipe))
        assert e.value.field == "evaluation.runtime" and e.value.exit_code == 1
        assert f"'{runtime}' needs ONNX Runtime's {provider}, which this onnxruntime does not have" in e.value.message
        assert "pip install 'edgeprune[gpu]'" in e.value.message


class _Session:
    """Stands in for onnxruntime.InferenceSession: records what it was asked for."""

    made: list[dict] = []

    def __init__(self, path, options, providers, disabled_optimizers):
        self.providers = providers
        _Session.made.append({"path": path, "providers": providers, "disabled": disabled_optimizers})

    def get_providers(self):
        return self.providers


@pytest.mark.parametrize("runtime, providers", [
    ("cpu", ["CPUExecutionProvider"]),
    ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_the_session_gets_the_providers_the_runtime_names(monkeypatch, tmp_path, runtime, providers):
    monkeypatch.setattr(onnxruntime, "InferenceSession", _Session)
    _Session.made.clear()
    runner = Runner(_Module(), tmp_path / "m.onnx", threads=2, disabled_optimizers=("X",), runtime=runtime)
    assert _Session.made == [{"path": str(tmp_path / "m.onnx"), "providers": providers, "disabled": ["X"]}]
    assert runner.providers == providers
    onnx_export.session(tmp_path / "m.onnx")  # the default (parity checks): the CPU
    assert _Session.made[-1]["providers"] == ["CPUExecutionProvider"]


class _Module:
    input_names = ("input_ids",)


def _run(bert_dir, stages, out: Path, **top) -> tuple[Path, dict]:
    path = write_recipe(out.parent, _recipe(bert_dir, stages, **top), f"{out.name}.yaml")
    folder = run(path, output=out)
    return folder, json.loads((folder / "manifest.json").read_text())


def _graph_digest(path: Path) -> str:
    """sha256 of the ONNX model without the metadata the exporter adds (source file paths of the trace)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    del model.metadata_props[:]
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _config_digest(path: Path) -> str:
    """sha256 of the checkpoint's config without the transformers version that wrote it (a new release of
    transformers changes that field and nothing the pipeline decided)."""
    config = {k: v for k, v in json.loads(path.read_text()).items() if k != "transformers_version"}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _hashes(folder: Path, manifest: dict) -> dict[str, str]:
    out = {a["path"]: a["sha256"] for a in manifest["artifacts"] if a["path"] in BEFORE}
    return {**out, "model.onnx without exporter metadata": _graph_digest(folder / "model.onnx"),
            "checkpoint/config.json without transformers_version": _config_digest(folder / "checkpoint" / "config.json")}


def test_a_cpu_run_writes_the_files_of_the_code_before_the_device_setting(bert_dir):
    """Run from a fixed folder, as the reference was (the model's path is part of the recipe)."""
    shutil.rmtree(FIXED, ignore_errors=True)
    FIXED.mkdir()
    model = FIXED / "bert"
    shutil.copytree(bert_dir, model)
    try:
        folder, m = _run(model, STAGES, FIXED / "run", device="cpu")
        assert _hashes(folder, m) == BEFORE
        assert m["stages"][2]["metrics"]["device"] == "cpu"
    finally:
        shutil.rmtree(FIXED, ignore_errors=True)


@CUDA
def test_a_cuda_run_matches_the_cpu_run(bert_dir, tmp_path):
    _, cpu = _run(bert_dir, EVALUATED, tmp_path / "cpu")
    _, gpu = _run(bert_dir, EVALUATED, tmp_path / "gpu", device="cuda")
    assert gpu["stages"][2]["metrics"]["device"] == "cuda"
    a, b = cpu["evaluation"]["comparison"], gpu["evaluation"]["comparison"]
    assert b["mean_cosine"] == pytest.approx(a["mean_cosine"], abs=1e-2)
    assert cpu["model"]["nonzero_params_after"] == gpu["model"]["nonzero_params_after"]


@CUDA
@pytest.mark.skipif("CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
                    reason="needs onnxruntime-gpu (pip install 'edgeprune[gpu]')")
def test_evaluate_measures_on_the_cuda_provider(bert_dir, tmp_path):
    recipe_eval = {"runtime": "cuda"}
    path = write_recipe(tmp_path, {**_recipe(bert_dir, EVALUATED, device="cuda"),
                                   "evaluation": {**_recipe(bert_dir)["evaluation"], **recipe_eval}})
    m = json.loads((run(path, output=tmp_path / "ort") / "manifest.json").read_text())
    assert m["evaluation"]["latency"]["providers"][0] == "CUDAExecutionProvider"
    assert m["evaluation"]["comparison"]["mean_cosine"] > 0.5
