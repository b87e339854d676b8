"""Artifacts are complete or refused: push checks the run folder against its manifest.json; pull
takes exactly the files manifest.json declares, with safe titles, streamed no further than their
declared sizes; malformed manifests and unusable destinations are one line; the folder registry
repairs damaged blobs and drops what killed pushes left."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from core.files import sha256_path
from export import registry
from export.registry import pull, push

from ..test_hostile_input import assert_one_line, cli


@pytest.fixture(scope="module")
def reg(deploy_run, tmp_path_factory) -> Path:
    """A folder registry holding deploy_run as good/minilm:v1, where tests add tags of their own."""
    root = tmp_path_factory.mktemp("artifact_registry")
    push(deploy_run, f"{root}/minilm:v1")
    return root


def _blobs(root: Path) -> Path:
    return root / "blobs" / "sha256"


def _publish(reg: Path, tag: str, mutate) -> str:
    """Tag ``tag`` in reg/minilm: the OCI manifest of v1 as ``mutate`` rewrites it (to bytes)."""
    root = reg / "minilm"
    index = json.loads((root / "index.json").read_text())
    v1 = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "v1")
    body = mutate(json.loads((_blobs(root) / v1["digest"][7:]).read_text()))
    digest = hashlib.sha256(body).hexdigest()
    (_blobs(root) / digest).write_bytes(body)
    index["manifests"].append({"mediaType": registry.OCI_MANIFEST, "digest": f"sha256:{digest}", "size": len(body),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    (root / "index.json").write_text(json.dumps(index))
    return f"{reg}/minilm:{tag}"


def _layer(oci: dict, title: str) -> dict:
    return next(la for la in oci["layers"] if la["annotations"][registry.TITLE] == title)


def _titled(title: str):
    def mutate(oci):
        oci["layers"][0]["annotations"][registry.TITLE] = title
        return json.dumps(oci).encode()
    return mutate


def _edit(change):
    def mutate(oci):
        change(oci)
        return json.dumps(oci).encode()
    return mutate


def _undeclared(oci):
    oci["layers"].append({**oci["layers"][0], "annotations": {registry.TITLE: "notes.txt"}})


def _duplicate(oci):
    oci["layers"].append(_layer(oci, "model.onnx"))


BAD = {
    "dot-slash manifest.json": (_titled("./manifest.json"), "title './manifest.json' is not a plain relative path"),
    "dot": (_titled("."), "title '.' is not a plain relative path"),
    "parent": (_titled("../evil"), "title '../evil' is not a plain relative path"),
    "double slash": (_titled("build//x"), "title 'build//x' is not a plain relative path"),
    "absolute": (_titled("/etc/evil"), "title '/etc/evil' is not a plain relative path"),
    "no title": (_titled(""), "title '' is not a plain relative path"),
    "manifest.json": (_titled("manifest.json"), "titled manifest.json, which the config blob is"),
    "file/folder clash": (_titled("build"), "title 'build' is both a file and a folder"),
    "twice": (_edit(_duplicate), "two artifact layers are titled 'model.onnx'"),
    "missing file": (_edit(lambda oci: oci["layers"].remove(_layer(oci, "model.onnx"))), "the artifact lacks model.onnx"),
    "undeclared file": (_edit(_undeclared), "layer 'notes.txt' is not among the files manifest.json declares"),
    "size": (_edit(lambda oci: _layer(oci, "model.onnx").update(size=_layer(oci, "model.onnx")["size"] + 1)),
             "model.onnx: the layer (sha256:"),
    "over 4 MiB": (lambda oci: json.dumps({**oci, "annotations": {"x": " " * (4 << 20)}}).encode(),
                   "is larger than 4194304 bytes; refusing it"),
    "not JSON": (lambda oci: b"{not json", "is not a valid OCI image manifest (Invalid JSON"),
    "a list": (lambda oci: b"[]", "is not a valid OCI image manifest"),
    "no layers": (_edit(lambda oci: oci.pop("layers")), "is not a valid OCI image manifest (layers: Field required)"),
    "digest path": (_edit(lambda oci: oci["layers"][0].update(digest="sha256:../../../../etc/passwd")),
                    "is not a valid OCI image manifest (layers.0.digest: String should match pattern"),
    "negative size": (_edit(lambda oci: oci["layers"][0].update(size=-1)), "(layers.0.size: Input should be greater"),
    "schema 1": (_edit(lambda oci: oci.update(schemaVersion=1)), "(schemaVersion: Input should be 2)"),
    "other config": (_edit(lambda oci: oci["config"].update(mediaType="application/json")),
                     "is not an edgeprune artifact"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_pull_refuses_malformed_and_incomplete_artifacts_in_one_line(case, reg, tmp_path):
    mutate, words = BAD[case]
    ref = _publish(reg, case.replace(" ", "-").replace("/", "-").replace(".", "d"), mutate)
    code, out, err = cli("pull", ref, str(tmp_path / "out"))
    assert words in assert_one_line(code, err, 1)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_pull_says_what_it_verified(deploy_run, reg, tmp_path):
    code, out, err = cli("pull", f"{reg}/minilm:v1", str(tmp_path / "out"))
    assert code == 0, err
    files = registry.deployable_files(deploy_run)
    size = sum((deploy_run / f).stat().st_size for f in files + ["manifest.json"])
    assert out == (f"pulled {reg}/minilm:v1 into {tmp_path / 'out'}: {len(files) + 1} files, {size:,} bytes: exactly "
                   "the files its manifest.json declares, each with the declared size and sha256\n")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == sorted(files + ["manifest.json"])


def test_pull_stops_reading_past_the_declared_size(deploy_run, tmp_path, monkeypatch):
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    push(deploy_run, ref)
    size = (deploy_run / "model.onnx").stat().st_size
    with open(_blobs(tmp_path / "reg" / "minilm") / sha256_path(deploy_run / "model.onnx"), "ab") as f:
        f.write(b"\0" * (64 << 20))
    read = []
    original = registry._FolderStore.blob

    def counted(self, digest):
        chunks = original(self, digest)
        inner = chunks.__enter__()

        class Counting:
            def __enter__(self):
                return (read.append(len(c)) or c for c in inner)

            def __exit__(self, *exc):
                return chunks.__exit__(*exc)
        return Counting()

    monkeypatch.setattr(registry._FolderStore, "blob", counted)
    code, _, err = cli("pull", ref, str(tmp_path / "out"))
    assert f"model.onnx: the registry sends more than the {size} bytes the manifest declares" in \
        assert_one_line(code, err, 1)
    assert sum(read) <= (deploy_run / "manifest.json").stat().st_size + size + registry.CHUNK * 8
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_oci_pull_stops_reading_past_the_declared_size(deploy_run, oci_registry, tmp_path):
    ref = f"oci://{oci_registry['host']}/edgeprune/grown:v1"
    push(deploy_run, ref)
    digest = sha256_path(deploy_run / "build" / "build_spec.json")
    data = oci_registry["data"] / "docker" / "registry" / "v2" / "blobs" / "sha256" / digest[:2] / digest / "data"
    data.write_bytes(data.read_bytes() + b" " * (8 << 20))
    code, _, err = cli("pull", ref, str(tmp_path / "out"))
    line = assert_one_line(code, err, 1)
    assert "build/build_spec.json: the registry sends more than the" in line, line
    assert not (tmp_path / "out").exists()


def test_pull_into_a_file_a_symlink_a_full_folder_or_a_read_only_place_is_one_line(reg, tmp_path):
    ref = f"{reg}/minilm:v1"
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert "'file' is a file" in assert_one_line(*cli("pull", ref, str(tmp_path / "file"))[::2]).replace(
        str(tmp_path) + "/", "")
    assert "is a symbolic link; pull into a new folder" in assert_one_line(*cli("pull", ref, str(tmp_path / "link"))[::2])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "exists and is not empty; pull into a new folder" in assert_one_line(
        *cli("pull", ref, str(tmp_path / "full"))[::2])
    line = assert_one_line(*cli("pull", ref, "/sys/edgeprune-pull")[::2], 1)  # read-only even for root
    assert line.startswith("error: DIR: could not write the pulled files to '/sys/edgeprune-pull': Operation not "
                           "permitted") or "Permission denied" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "full", "link"]
    assert not list((tmp_path / "empty").iterdir()) and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def _copy(deploy_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(deploy_run, run_dir)
    return run_dir


def test_push_refuses_a_folder_that_is_not_what_its_manifest_declares(deploy_run, tmp_path):
    run_dir = _copy(deploy_run, tmp_path)
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    (run_dir / "model.onnx").unlink()
    line = assert_one_line(*cli("push", str(run_dir), ref)[::2], 1)
    assert line == (f"error: RUN_DIR: {run_dir}/model.onnx is missing (1 of the files manifest.json declares); "
                    "restore it, or rerun the pipeline")
    shutil.copy(deploy_run / "model.onnx", run_dir / "model.onnx")
    (run_dir / "build" / "notes.txt").write_text("not part of the run")
    line = assert_one_line(*cli("push", str(run_dir), ref)[::2], 1)
    assert line == (f"error: RUN_DIR: {run_dir}/build/notes.txt is not among the files manifest.json declares "
                    "(1 such files); remove them, or rerun the pipeline")
    assert not (tmp_path / "reg").exists()


def test_engines_built_later_travel_when_their_engine_json_records_them(deploy_run, tmp_path):
    run_dir = _copy(deploy_run, tmp_path)
    engines = run_dir / "build" / "engines" / "trt10.3-sm87"
    engines.mkdir(parents=True)
    (engines / "model.plan").write_bytes(b"engine bytes")
    (engines / "engine.json").write_text(json.dumps({"key": "trt10.3-sm87", "engines": [
        {"plan": "model.plan", "sha256": hashlib.sha256(b"engine bytes").hexdigest()}]}))
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    assert cli("push", str(run_dir), ref)[0] == 0
    code, out, _ = cli("pull", ref, str(tmp_path / "out"))
    assert code == 0 and "(and 2 engine files, plans as their engine.json records)" in out
    assert (tmp_path / "out" / "build" / "engines" / "trt10.3-sm87" / "model.plan").read_bytes() == b"engine bytes"
    (engines / "model.plan").write_bytes(b"other bytes")
    assert "build/engines/trt10.3-sm87/model.plan changed after the run recorded its sha256" in assert_one_line(
        *cli("push", str(run_dir), ref)[::2], 1)


def test_folder_registry_replaces_a_damaged_blob_on_push(deploy_run, tmp_path):
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    push(deploy_run, ref)
    blob = _blobs(tmp_path / "reg" / "minilm") / sha256_path(deploy_run / "model.onnx")
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    assert push(deploy_run, ref)["uploaded_blobs"] == 1
    pull(ref, tmp_path / "out")
    assert sha256_path(tmp_path / "out" / "model.onnx") == sha256_path(deploy_run / "model.onnx")


def _killed_push(run_dir: Path, ref: str) -> None:
    """Push, killed (SIGKILL) as the third blob's temp file is about to take its name."""
    original, seen = Path.replace, []

    def replace(self, target):
        if self.name.startswith("."):
            seen.append(self)
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, target)
    Path.replace = replace  # type: ignore[method-assign]
    try:
        push(run_dir, ref)
    finally:
        os._exit(3)


def test_folder_registry_drops_temp_files_of_killed_pushes(deploy_run, tmp_path):
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    child = multiprocessing.get_context("fork").Process(target=_killed_push, args=(deploy_run, ref))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    blobs = _blobs(tmp_path / "reg" / "minilm")
    assert len(list(blobs.glob(".*"))) == 1
    busy = blobs / f".{'0' * 64}.tmp-{os.getpid()}-{socket.gethostname()}"  # a push still running here
    busy.write_bytes(b"")
    push(deploy_run, ref)
    assert list(blobs.glob(".*")) == [busy]
    pull(ref, tmp_path / "out")


def test_push_to_a_folder_registry_it_cannot_write_is_one_line(deploy_run):
    line = assert_one_line(*cli("push", str(deploy_run), "/sys/edgeprune-registry/minilm:v1")[::2], 1)
    assert line.startswith("error: cannot write to /sys/edgeprune-registry/minilm: Operation not permitted") or \
        "Permission denied" in line


def test_a_damaged_folder_registry_index_is_one_line(deploy_run, tmp_path):
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    push(deploy_run, ref)
    index = tmp_path / "reg" / "minilm" / "index.json"
    for damage in ("{not json", '{"manifests": [{"digest": "sha256:../../x"}]}'):
        index.write_text(damage)
        for argv in (["push", str(deploy_run), ref], ["pull", ref, str(tmp_path / "out")]):
            assert assert_one_line(*cli(*argv)[::2], 1) == f"error: {index} is not a valid OCI index; repair or remove it"
        assert index.read_text() == damage and not (tmp_path / "out").exists()


def test_the_text_graph_files_the_artifact_ships_are_the_ones_the_selectors_write():
    from export import artifact
    from methods.tokens import text

    assert artifact.TEXT_TOKENIZER == text.TEXT_TOKENIZER
    assert text.TEXT_FILE in artifact._TOP
