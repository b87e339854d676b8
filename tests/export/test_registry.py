"""Push and pull through a local folder registry and a real OCI registry on loopback
(Debian's docker-registry, started by the fixture): round trip, idempotence, tampering, interruption."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import requests

from core.errors import RecipeError
from core.files import sha256_path
from export import local_registry as registry_server
from export import registry
from export.registry import RegistryError, parse_ref, pull, push
from pipeline.__main__ import main
from pipeline.recipe import parse_recipe

from ..conftest import text_recipe, write_recipe


def _pushed_files(run_dir: Path) -> list[str]:
    return registry.deployable_files(run_dir)


def _same_files(a: Path, b: Path, files: list[str]) -> None:
    for rel in files + ["manifest.json"]:
        assert sha256_path(a / rel) == sha256_path(b / rel), rel


def test_parse_ref():
    assert parse_ref("oci://127.0.0.1:5000/edge/minilm:v1") == registry.Ref("oci", "127.0.0.1:5000", "edge/minilm", "v1")
    assert parse_ref("registry/minilm") == registry.Ref("folder", "registry", "minilm", "latest")
    assert parse_ref("file:///srv/models/minilm:2") == registry.Ref("folder", "/srv/models", "minilm", "2")
    for bad in ("oci://host", "s3://bucket/x:1", "reg/MiniLM:v1", "reg/minilm:bad tag"):
        with pytest.raises(ValueError):
            parse_ref(bad)


def test_what_is_pushed(deploy_run):
    files = _pushed_files(deploy_run)
    assert files[:3] == ["recipe.yaml", "report.md", "model.onnx"]
    assert {"build/build_spec.json", "build/build_engine.sh", "build/golden/inputs.json"} <= set(files)
    assert {"preprocessor/tokenizer.json", "stages/01-prune_weights/sparsity_per_layer.png"} <= set(files)
    assert not any(f.startswith("checkpoint/") or (f.startswith("stages/") and not f.endswith(".png")) for f in files)


def test_folder_registry_round_trip_idempotent_and_tamper_proof(deploy_run, tmp_path):
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    first = push(deploy_run, ref)
    again = push(deploy_run, ref)
    assert again["digest"] == first["digest"] and again["uploaded_blobs"] == 0
    index = json.loads((tmp_path / "reg" / "minilm" / "index.json").read_text())
    assert len(index["manifests"]) == 1 and index["manifests"][0]["digest"] == first["digest"]
    pull(ref, tmp_path / "out")
    _same_files(deploy_run, tmp_path / "out", _pushed_files(deploy_run))
    assert os.access(tmp_path / "out" / "build" / "build_engine.sh", os.X_OK)
    # flip one byte of the ONNX blob in the registry: the pull refuses and leaves nothing behind
    blob = tmp_path / "reg" / "minilm" / "blobs" / "sha256" / sha256_path(deploy_run / "model.onnx")
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="model.onnx: downloaded content has sha256:.*refusing the pull"):
        pull(ref, tmp_path / "out2")
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.partial"))


def test_folder_push_interrupted_leaves_the_tag_as_it_was(deploy_run, tmp_path, monkeypatch):
    ref = f"{tmp_path / 'reg'}/minilm:v1"
    calls = []

    def failing(self, path, descriptor):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, path, descriptor)

    original = registry._FolderStore.put_blob
    monkeypatch.setattr(registry._FolderStore, "put_blob", failing)
    with pytest.raises(KeyboardInterrupt):
        push(deploy_run, ref)
    with pytest.raises(RegistryError, match="no tag 'v1'"):
        pull(ref, tmp_path / "out")
    monkeypatch.setattr(registry._FolderStore, "put_blob", original)
    assert push(deploy_run, ref)["uploaded_blobs"] == len(_pushed_files(deploy_run)) + 1 - 2


def test_oci_round_trip_media_types_and_annotations(deploy_run, oci_registry, tmp_path):
    host = oci_registry["host"]
    ref = f"oci://{host}/edgeprune/minilm:v1"
    first = push(deploy_run, ref)
    r = requests.get(f"http://{host}/v2/edgeprune/minilm/manifests/v1",
                     headers={"Accept": registry.OCI_MANIFEST}, timeout=5)
    assert r.headers["Docker-Content-Digest"] == first["digest"]
    manifest = r.json()
    assert manifest["config"]["mediaType"] == "application/vnd.edgeprune.manifest.v1+json"
    types = {layer["annotations"][registry.TITLE]: layer["mediaType"] for layer in manifest["layers"]}
    assert types["model.onnx"] == "application/vnd.edgeprune.onnx.model.v1"
    assert types["recipe.yaml"] == "application/vnd.edgeprune.recipe.v1+yaml"
    assert types["build/build_spec.json"] == "application/vnd.edgeprune.trt.buildspec.v1+json"
    m = json.loads((deploy_run / "manifest.json").read_text())
    a = manifest["annotations"]
    assert a["vnd.edgeprune.model.source"] == m["model"]["source"]
    assert a["vnd.edgeprune.recipe.sha256"] == m["recipe"]["sha256"]
    assert a["vnd.edgeprune.target"] == "jetson-orin-jp6" and a["vnd.edgeprune.tensorrt"] == "10.3.0"
    assert json.loads(a["vnd.edgeprune.metrics"])["onnx_parity_max_rel_err"] == m["onnx"]["parity"]["max_rel_err"]
    onnx_layer = next(layer for layer in manifest["layers"] if layer["annotations"][registry.TITLE] == "model.onnx")
    assert onnx_layer["annotations"]["vnd.edgeprune.onnx.opset"] == "18"
    # pushing the same run again changes nothing: same digest, no new blob, one tag
    again = push(deploy_run, ref)
    assert again["digest"] == first["digest"] and again["uploaded_blobs"] == 0
    assert requests.get(f"http://{host}/v2/edgeprune/minilm/tags/list", timeout=5).json()["tags"] == ["v1"]
    assert main(["pull", ref, str(tmp_path / "out")]) == 0
    _same_files(deploy_run, tmp_path / "out", _pushed_files(deploy_run))


def test_oci_tampered_blob_is_rejected(deploy_run, oci_registry, tmp_path, capsys):
    ref = f"oci://{oci_registry['host']}/edgeprune/tamper:v1"
    push(deploy_run, ref)
    digest = sha256_path(deploy_run / "build" / "build_spec.json")
    data = oci_registry["data"] / "docker" / "registry" / "v2" / "blobs" / "sha256" / digest[:2] / digest / "data"
    data.write_bytes(data.read_bytes().replace(b"1024", b"2048"))  # a different workspace, same size
    assert main(["pull", ref, str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "build/build_spec.json: downloaded content has sha256:" in err and "refusing the pull" in err
    assert not (tmp_path / "out").exists()


def test_oci_push_interrupted_publishes_no_tag(deploy_run, oci_registry, tmp_path, monkeypatch):
    host = oci_registry["host"]
    original = registry._OciStore.put_blob
    calls = []

    def failing(self, path, descriptor):
        calls.append(path)
        if len(calls) == 2:
            raise ConnectionError("network went away")
        return original(self, path, descriptor)

    monkeypatch.setattr(registry._OciStore, "put_blob", failing)
    with pytest.raises(ConnectionError):
        push(deploy_run, f"oci://{host}/edgeprune/halfway:v1")
    assert requests.get(f"http://{host}/v2/edgeprune/halfway/manifests/v1",
                        headers={"Accept": registry.OCI_MANIFEST}, timeout=5).status_code == 404
    assert main(["pull", f"oci://{host}/edgeprune/halfway:v1", str(tmp_path / "out")]) == 1


# bcrypt (cost 4, fast to check) of "s3cret"; docker-registry's htpasswd takes bcrypt only
HTPASSWD = "ci:$2b$04$o2ljEtBIQCs7x2zvof4Rn.R/AWdfaU2F8Hws3vE0ekwZ1RrjBFw4q"


def test_oci_credentials_come_from_the_environment(deploy_run, oci_registry, tmp_path, monkeypatch, capsys):
    """A second loopback registry, with Basic auth (``oci_registry`` makes this skip where the binary is absent)."""
    (tmp_path / "auth").mkdir()
    proc, host = registry_server.start(tmp_path / "auth", htpasswd=HTPASSWD)
    try:
        ref = f"oci://{host}/edgeprune/private:v1"
        assert main(["push", str(deploy_run), ref]) == 1
        assert f"registry {host} needs credentials: set EDGEPRUNE_REGISTRY_USER" in capsys.readouterr().err
        monkeypatch.setenv("EDGEPRUNE_REGISTRY_USER", "ci")
        monkeypatch.setenv("EDGEPRUNE_REGISTRY_PASSWORD", "wrong")
        assert main(["push", str(deploy_run), ref]) == 1
        assert "authentication required" in capsys.readouterr().err
        monkeypatch.setenv("EDGEPRUNE_REGISTRY_PASSWORD", "s3cret")
        assert main(["push", str(deploy_run), ref]) == 0
        assert main(["pull", ref, str(tmp_path / "out")]) == 0
        _same_files(deploy_run, tmp_path / "out", _pushed_files(deploy_run))
    finally:
        registry_server.stop(proc)
    with pytest.raises(RecipeError, match="never from the recipe"):
        parse_recipe({"name": "t", "model": {"source": "x", "task": "feature-extraction"}, "stages": [{"type": "export"}],
                      "publish": {"ref": "oci://h/r:t", "password": "p"}})


def test_unreachable_registry_is_one_line(deploy_run, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["push", str(deploy_run), f"oci://127.0.0.1:{port}/edgeprune/x:v1"]) == 1
    assert f"registry 127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    assert main(["push", str(deploy_run), "oci://nohost"]) == 2


def test_recipe_publish_block_pushes_the_finished_run(bert_dir, tmp_path):
    from pipeline.runner import run

    ref = f"{tmp_path / 'reg'}/published:v1"
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "export"}], publish={"ref": ref})
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "run")
    pull(ref, tmp_path / "pulled")
    _same_files(out, tmp_path / "pulled", _pushed_files(out))


def test_push_refuses_files_changed_since_the_run(deploy_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(deploy_run, run_dir)
    with open(run_dir / "build" / "build_spec.json", "a") as f:
        f.write(" ")
    with pytest.raises(RegistryError, match="build/build_spec.json changed after the run recorded its sha256"):
        push(run_dir, f"{tmp_path / 'reg'}/minilm:v1")
    assert not (tmp_path / "reg" / "minilm" / "index.json").exists()
