"""Hostile and careless input: every failure is one line on stderr, the right exit code, no traceback,
nothing written, and nothing secret echoed.

The CLI runs in-process (`pipeline.__main__.main`) so the suite stays fast; one subprocess checks
that a malformed recipe fails before torch is imported. Generated cases (hypothesis) mutate a valid
recipe over its schema: wrong types, out-of-range numbers, unknown keys, removed keys, bad regexes;
and feed arbitrary bytes as a recipe file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import targets
from core.errors import RecipeError
from pipeline.__main__ import main
from pipeline.recipe import load_recipe, parse_recipe
from pipeline.recipe_file import MAX_BYTES
from pipeline.runner import plan

from .conftest import build_bert, text_recipe, write_recipe

SECRET = "hunter2-Sup3rSecret"
STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"}, {"type": "export"}]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def assert_one_line(code: int, err: str, expected: int = 2) -> str:
    assert code == expected, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and len(lines[0]) < 700
    return lines[0]


def refused(path: Path, tmp: Path, expected: int = 2) -> str:
    """validate and run both refuse ``path`` in one line, and run writes nothing."""
    line = assert_one_line(*cli("validate", str(path))[::2], expected)
    run_refused(path, tmp, line, expected)
    return line


def run_refused(path: Path, tmp: Path, line: str, expected: int = 2) -> None:
    out = tmp / "out"
    code, _, err = cli("run", str(path), "--output", str(out))
    assert assert_one_line(code, err, expected) == line
    assert not out.exists() and not (tmp / ".out.partial").exists()


def base(model_dir: Path) -> dict:
    return text_recipe(model_dir, "feature-extraction", copy.deepcopy(STAGES))


# --- bounded input -------------------------------------------------------------------------------

def _alias_bomb() -> str:
    """Under 500 bytes that expand to 9**9 strings wherever the value is walked (a message quoting it)."""
    nested = ", ".join([f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)])
    return ("name: bomb\nmodel: {source: x, task: causal-lm}\nstages:\n- type: calibrate\n  gradient_samples: "
            f"[&a0 [a,a,a,a,a,a,a,a,a], {nested}]\n")


@pytest.mark.parametrize("content, words", [
    (_alias_bomb(), "anchors and aliases"),
    ("name: x\nname: y\nmodel: {source: x, task: causal-lm}\nstages: [{type: calibrate}]\n", "duplicate key 'name'"),
    ("name: x\nstages:\n  - {type: calibrate, type: export}\n", "duplicate key 'type'"),
    ("name: " + "[" * 100 + "]" * 100 + "\n", "nested more than"),
    ("name: " + "9" * 5000 + "\n", "cannot convert"),
    ("name: x\n" + "#" * (MAX_BYTES + 1) + "\n", "larger than 1024 KiB"),
    ("name: x\nstages: [\n", "not valid YAML at line 3"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_malformed_files_are_one_line(tmp_path, content, words):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    assert words in refused(path, tmp_path)


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 at offset 9)" in refused(path, tmp_path)


def test_a_huge_bad_value_is_quoted_by_a_short_prefix(bert_dir, tmp_path):
    recipe = base(bert_dir)
    recipe["name"] = "x" * 200_000 + "!"
    line = refused(write_recipe(tmp_path, recipe), tmp_path)
    assert line.startswith("error: name: 'xxxx") and "...xxx" in line and len(line) < 200


def test_a_bad_regex_is_quoted_short(bert_dir):
    recipe = base(bert_dir)
    recipe["stages"][1]["targets"] = ["re:(" + "y" * 100_000]
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(recipe))
    assert e.value.field == "stages[1].targets[0]" and len(str(e.value)) < 400


def test_target_patterns_compile_once_per_select(monkeypatch):
    """Each pattern is compiled once, whatever the number of candidates (re's own cache holds 512)."""
    compiled: Counter = Counter()
    real = re._compile  # type: ignore[attr-defined]
    monkeypatch.setattr(re, "_compile", lambda pattern, flags: compiled.update([pattern]) or real(pattern, flags))
    patterns = [f"re:layer\\.{i}x" for i in range(600)] + ["re:layer\\.\\d+$"]
    candidates = {f"layer.{i}": targets.nn.Identity() for i in range(50)}
    assert len(targets.select(candidates, patterns, ["re:layer\\.7$"], "s")) == 49
    assert compiled[patterns[0][3:]] == 1 and compiled["layer\\.\\d+$"] == 1


# --- secrets -------------------------------------------------------------------------------------

def _files_with(folder: Path, secret: str, besides: Path | None = None) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p != besides and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("section, value", [
    ("publish", {"ref": f"oci://bob:{SECRET}@registry.example.com/team/model:v1"}),
    ("publish", {"ref": f"oci://{SECRET}@registry.example.com/team/model:v1"}),
    ("calibration", {"source": "datasets", "dataset": {"name": f"https://hub.example/d?token={SECRET}"}}),
])
def test_credentials_in_a_recipe_are_refused_and_never_echoed(bert_dir, tmp_path, section, value):
    path = write_recipe(tmp_path, {**base(bert_dir), section: value})
    line = refused(path, tmp_path)
    assert "credential" in line and "EDGEPRUNE_REGISTRY_PASSWORD" in line and SECRET not in line
    assert _files_with(tmp_path, SECRET, besides=path) == []


def test_the_value_of_a_credential_variable_is_refused(bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_REGISTRY_PASSWORD", SECRET)
    recipe = base(bert_dir)
    recipe["stages"][1]["name"] = SECRET
    line = refused(write_recipe(tmp_path, recipe), tmp_path)
    assert line.startswith("error: stages[1].name: '***' holds a credential")


@pytest.mark.parametrize("command", ["push", "pull"])
def test_credentials_on_the_command_line_are_refused(tmp_path, command):
    ref = f"oci://bob:{SECRET}@127.0.0.1:1/team/model:v1"
    args = [str(tmp_path / "run"), ref] if command == "push" else [ref, str(tmp_path / "dest")]
    code, out, err = cli(command, *args)
    line = assert_one_line(code, err)
    assert line.startswith("error: registry_ref: 'oci://***@127.0.0.1:1/team/model:v1' holds a credential")
    assert SECRET not in out + err and not list(tmp_path.iterdir())


def test_events_never_hold_a_credential(tmp_path, monkeypatch):
    from core.events import Events

    monkeypatch.setenv("HF_TOKEN", "hf_" + SECRET)
    events = Events(tmp_path / "events.jsonl")
    events.emit("x", ref=f"oci://bob:{SECRET}@h/r:t", url=f"https://h/p?a=1&token={SECRET}", env="hf_" + SECRET,
                nested={"k": [Path(f"/x/hf_{SECRET}")]})
    text = (tmp_path / "events.jsonl").read_text()
    assert SECRET not in text and json.loads(text)["ref"] == "oci://***@h/r:t"


def test_no_file_a_run_a_push_and_a_pull_write_holds_a_credential(bert_dir, tmp_path, monkeypatch):
    """With registry credentials and a Hub token in the environment: a run that publishes to a folder
    registry, a push and a pull; every file any of them wrote, and all they printed, is searched."""
    secrets = ["pw-" + SECRET, "hf_" + SECRET[::-1]]
    monkeypatch.setenv("EDGEPRUNE_REGISTRY_USER", "ci")
    monkeypatch.setenv("EDGEPRUNE_REGISTRY_PASSWORD", secrets[0])
    monkeypatch.setenv("HF_TOKEN", secrets[1])
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    reg = tmp_path / "registry"
    recipe = write_recipe(tmp_path, {**base(bert_dir), "publish": {"ref": f"{reg}/model:v1"}})
    printed = ""
    for argv in (["run", str(recipe), "--output", str(tmp_path / "run")], ["push", str(tmp_path / "run"), f"{reg}/model:v2"],
                 ["pull", f"{reg}/model:v2", str(tmp_path / "pulled")]):
        code, out, err = cli(*argv)
        assert code == 0, err
        printed += out + err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"run/manifest.json", "run/events.jsonl", "registry/model/index.json", "pulled/model.onnx"} <= {
        p.relative_to(tmp_path).as_posix() for p in written} and len(written) > 40
    for secret in secrets:
        assert secret not in printed
        assert _files_with(tmp_path, secret) == []


# --- remote code ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def remote_code_model(tmp_path_factory):
    """A BERT folder whose config names its own Python class, which leaves a marker when imported."""
    folder = build_bert(tmp_path_factory.mktemp("remote_code"))
    marker = folder.parent / "code-ran"
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig\n\n\nclass EvilConfig(BertConfig):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    return folder, marker


def test_a_recipe_alone_never_runs_model_code(remote_code_model, tmp_path):
    folder, marker = remote_code_model
    recipe = base(folder)
    recipe["model"]["trust_remote_code"] = True
    path = write_recipe(tmp_path, recipe)
    code, out, err = cli("validate", str(path))
    assert code == 0 and out.startswith("ok: t: bert"), err
    code, _, err = cli("run", str(path), "--output", str(tmp_path / "out"))
    line = assert_one_line(code, err)
    assert line.startswith("error: model.trust_remote_code:") and "--trust-remote-code" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert load_recipe(path, "allow").model.trust_remote_code  # what run --trust-remote-code loads
    assert not load_recipe(path, "skip").model.trust_remote_code  # what validate loads


# --- models and shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"not a gguf file\n", b"GGUF\x03\x00\x00\x00trailing", b""])
def test_a_gguf_that_is_not_gguf(bert_dir, tmp_path, content):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    recipe = text_recipe(fake, "causal-lm", [{"type": "calibrate"}])
    line = refused(write_recipe(tmp_path, recipe), tmp_path)
    assert line.startswith("error: model.source:") and "is not a readable GGUF file" in line


@pytest.mark.parametrize("config", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_model_folder_with_a_broken_config(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(config.encode("latin-1"))
    (folder / "model.safetensors").write_bytes(b"")
    line = refused(write_recipe(tmp_path, base(folder)), tmp_path)
    assert line.startswith("error: model.source:") and "config.json" in line


@pytest.mark.parametrize("section", ["export", "calibration"])
def test_seq_len_beyond_the_models_positions(bert_dir, tmp_path, section):
    recipe = base(bert_dir)  # the tiny BERT has 128 positions
    recipe[section]["seq_len"] = 129
    line = refused(write_recipe(tmp_path, recipe), tmp_path)
    assert line == f"error: {section}.seq_len: 129 is more tokens than the model's 128 positions " \
                   "(max_position_embeddings); use at most 128"


@pytest.mark.parametrize("structured, pattern, words", [
    ({"align": 1}, "2:4", "multiples of 1 but not of 4 (e.g. encoder.layer.0.output.dense)"),
    ({"align": 8, "modules": "attention"}, "2:16", "multiples of 8 but not of 16 (e.g. encoder.layer.0.attention.output"),
])
def test_nm_checked_against_widths_after_structured_pruning(bert_dir, tmp_path, structured, pattern, words):
    """The unpruned widths (64 MLP, 4 heads x 8) are divisible; what structured pruning leaves may not be."""
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": "magnitude-sp", "ratio": 0.2, **structured},
              {"type": "prune_weights", "method": "magnitude", "pattern": pattern}]
    line = refused(write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages)), tmp_path)
    assert line.startswith("error: stages[2].pattern: stages[1] (prune_structured) can leave") and words in line


def test_nm_after_aligned_structured_pruning_is_accepted(bert_dir):
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": "magnitude-sp", "ratio": 0.2, "align": 8},
              {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"}]
    assert plan(parse_recipe(text_recipe(bert_dir, "feature-extraction", stages))).labels[2] == "prune_weights"


def _int4_after_structured(bert_dir, structured: dict, **int4) -> dict:
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": "magnitude-sp", "ratio": 0.2, **structured},
              {"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 16, **int4}]
    return text_recipe(bert_dir, "feature-extraction", stages, export={"tensorrt": {"target": "x86-trt10"}})


@pytest.mark.parametrize("structured, words", [
    ({"align": 1, "modules": "mlp"}, "multiples of 1 but not of 16 (e.g. encoder.layer.0.output.dense)"),
    ({"align": 8, "modules": "attention"}, "multiples of 8 but not of 16 (e.g. encoder.layer.0.attention.output"),
])
def test_int4_groups_checked_against_widths_after_structured_pruning(bert_dir, tmp_path, structured, words):
    """Group 16 divides the unpruned widths (32, 64); what structured pruning leaves may not be divisible."""
    line = refused(write_recipe(tmp_path, _int4_after_structured(bert_dir, structured)), tmp_path)
    assert line.startswith("error: stages[3].group_size: stages[1] (prune_structured) can leave") and words in line
    assert line.endswith("or set 'partial_groups: true' (TensorRT support unverified)")


def test_int4_after_aligned_structured_pruning_or_with_partial_groups_is_accepted(bert_dir):
    for recipe in (_int4_after_structured(bert_dir, {"align": 16, "modules": "mlp"}),
                   _int4_after_structured(bert_dir, {"align": 1}, partial_groups=True)):
        assert plan(parse_recipe(recipe)).labels[3] == "quantize"


# --- the environment -----------------------------------------------------------------------------

def _as_another_user(argv: list[str], conn) -> None:
    """The CLI in a forked child that, under root (who reads any file), first becomes nobody."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    conn.send(cli(*argv))
    os._exit(0)


def test_an_unreadable_recipe_is_one_line_exit_1(bert_dir):
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        path = write_recipe(folder, base(bert_dir))
        path.chmod(0)
        receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
        child = multiprocessing.get_context("fork").Process(target=_as_another_user, args=(["validate", str(path)], send))
        child.start()
        code, _, err = receive.recv()
        child.join()
    finally:
        shutil.rmtree(folder)
    assert assert_one_line(code, err, 1) == f"error: recipe: cannot read '{path}': Permission denied; give this " \
                                            "user read permission"


def test_an_unwritable_output_is_one_line_saying_nothing_was_written(bert_dir, tmp_path):
    code, _, err = cli("run", str(write_recipe(tmp_path, base(bert_dir))), "--output", "/sys/edgeprune-run/out")
    assert assert_one_line(code, err, 1).startswith("error: output: Operation not permitted ('/sys/edgeprune-run'); "
                                                    "nothing was written")


def test_a_full_disk_during_a_run_is_one_line_saying_how_to_resume(bert_dir, tmp_path, monkeypatch):
    import pipeline.runner

    original = pipeline.runner.write_atomic

    def full(path: Path, data) -> None:
        if path.as_posix().endswith("01-prune_weights/result.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, data)

    recipe, out = write_recipe(tmp_path, base(bert_dir)), tmp_path / "out"
    monkeypatch.setattr(pipeline.runner, "write_atomic", full)
    code, _, err = cli("run", str(recipe), "--output", str(out))
    assert code == 1 and "Traceback" not in err and [ln for ln in err.splitlines() if "error" in ln] == [
        err.splitlines()[-1]]  # the progress lines before it, then one error line
    assert err.splitlines()[-1] == (
        f"error: output: No space left on device ('{tmp_path}/.out.partial/stages/01-prune_weights/result.json'); "
        f"the partial run is kept in {tmp_path}/.out.partial: free space or fix permissions, then rerun with --resume")
    monkeypatch.setattr(pipeline.runner, "write_atomic", original)
    assert cli("run", str(recipe), "--output", str(out), "--resume")[0] == 0
    assert [s["status"] for s in json.loads((out / "manifest.json").read_text())["stages"]] == ["resumed", "ran", "ran"]


# --- fast failure --------------------------------------------------------------------------------

def test_a_malformed_recipe_fails_before_torch_is_imported(bert_dir, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nstages: [\n")
    bad_task = write_recipe(tmp_path, {**base(bert_dir), "model": {"source": str(bert_dir), "task": "nope"}}, "task.yaml")
    cases = [["validate", str(bad_yaml)], ["run", str(bad_task)], ["validate", str(tmp_path / "absent.yaml")]]
    script = ("import json, sys\nfrom pipeline.__main__ import main\n"
              f"codes = [main(args) for args in {cases!r}]\n"
              "print(json.dumps([codes, 'torch' in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert json.loads(proc.stdout.splitlines()[-1]) == [[2, 2, 2], False], proc.stderr
    assert len(proc.stderr.splitlines()) == 3


# --- generated cases -----------------------------------------------------------------------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=8),
    st.sampled_from(["re:(", "re:[", "re:*", "re:.*", "2:4", "4:2", "0:0", "", "flap", "int8", "builtin", "-1"]),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(value, prefix=()) -> list[tuple]:
    """Every location inside a recipe, except model.source (a junk one could name a hub model)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    found = []
    for key, item in items:
        path = (*prefix, key)
        if path != ("model", "source"):
            found += [path, *_paths(item, path)]
    return found


@st.composite
def mutated(draw, recipe: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    path = draw(st.sampled_from(_paths(recipe)))
    parent = recipe
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "add", "delete"]))
    if action == "replace":
        parent[path[-1]] = draw(JUNK)
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=12))] = draw(JUNK)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return recipe


@pytest.fixture(scope="module")
def valid_recipe(bert_dir) -> dict:
    return base(bert_dir)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(data=st.data())
def test_generated_recipes_validate_or_fail_in_one_line(valid_recipe, data):
    recipe = data.draw(mutated(valid_recipe))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=False))
        code, out, err = cli("validate", str(path))
        if code == 0:
            assert out.startswith("ok: ") and not err
        else:
            run_refused(path, Path(tmp), assert_one_line(code, err))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_arbitrary_bytes_fail_in_one_line(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(content)
        assert_one_line(*cli("validate", str(path))[::2])
