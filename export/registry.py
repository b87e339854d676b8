"""Push a run folder to a registry as one OCI artifact, and pull it back with every digest checked.

References (``REGISTRY_REF``):

- ``oci://HOST[:PORT]/REPO[:TAG]``: any OCI registry, through oras-py. Plain HTTP for loopback
  hosts (or with ``EDGEPRUNE_REGISTRY_INSECURE=1``); credentials only from the environment
  (``EDGEPRUNE_REGISTRY_USER``, ``EDGEPRUNE_REGISTRY_PASSWORD``).
- ``DIR/REPO[:TAG]`` or ``file://DIR/REPO[:TAG]``: a local folder holding one OCI image layout
  per repository (``oci-layout``, ``index.json``, ``blobs/sha256/``), readable by ``oras
  --oci-layout``.

The artifact is an OCI image manifest whose config blob is the run's ``manifest.json`` and whose
layers are the deployable files, each with its own media type and annotations (title = path in
the run folder). Blobs go first and the manifest goes under the tag last, so an interrupted push
leaves the tag as it was; content addressing makes a repeated push a no-op. Pull downloads into
a temporary folder, checks every blob against the OCI manifest *and* against ``manifest.json``,
and only then moves the folder into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests
import requests.adapters
from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import RecipeError
from core.files import sha256_path, write_atomic
from core.lock import alive

from .artifact import (
    GENERATION,
    PREPROCESSOR,
    TEXT_TOKENIZER,
    TITLE,
    Descriptor,
    RegistryError,
    check_digest,
    check_layers,
    check_titles,
    parse_declared,
    parse_oci,
    pushed_files,
)

VENDOR = "application/vnd.edgeprune"
CONFIG_MEDIA_TYPE = f"{VENDOR}.manifest.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ANNOTATION = "vnd.edgeprune"
TIMEOUT_S = 30  # every HTTP request: connect and read
_LOOPBACK = ("127.", "localhost", "[::1]")
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20  # what OCI registries accept for an image manifest
MAX_CONFIG_BYTES = 64 << 20  # manifest.json: a few kilobytes in practice
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_REPO = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


@dataclass(frozen=True)
class Ref:
    kind: str  # "oci" | "folder"
    location: str  # HOST[:PORT] or the folder
    repo: str
    tag: str

    def __str__(self) -> str:
        return f"oci://{self.location}/{self.repo}:{self.tag}" if self.kind == "oci" else \
            f"{self.location}/{self.repo}:{self.tag}"


def parse_ref(ref: str) -> Ref:
    """``oci://host:port/repo:tag`` or ``[file://]dir/repo:tag`` (tag defaults to ``latest``)."""
    if ref.startswith("oci://"):
        host, _, rest = ref.removeprefix("oci://").partition("/")
        if not host or not rest:
            raise ValueError(f"{ref!r}: expected oci://HOST[:PORT]/REPO[:TAG]")
        repo, tag = _split_tag(rest, ref)
        return Ref("oci", host, repo, tag)
    path = ref.removeprefix("file://")
    if "://" in path:
        raise ValueError(f"{ref!r}: unknown scheme; use oci://HOST[:PORT]/REPO:TAG or a folder DIR/REPO:TAG")
    folder, _, last = path.rstrip("/").rpartition("/")
    repo, tag = _split_tag(last, ref)
    return Ref("folder", folder or ".", repo, tag)


def _split_tag(repo_tag: str, ref: str) -> tuple[str, str]:
    repo, _, tag = repo_tag.partition(":")
    tag = tag or "latest"
    if not _REPO.match(repo):
        raise ValueError(f"{ref!r}: repository {repo!r} must be lowercase letters, digits and . _ - (/ for paths)")
    if not _TAG.match(tag):
        raise ValueError(f"{ref!r}: tag {tag!r} must be letters, digits and . _ - (at most 128)")
    return repo, tag


def _ref(ref: str) -> Ref:
    try:
        return parse_ref(ref)
    except ValueError as e:
        raise RecipeError(str(e), field="REGISTRY_REF") from None


# -- what is pushed -----------------------------------------------------------------------------

def _media_type(rel: str) -> str:
    p = PurePosixPath(rel)
    if rel == "model.onnx" or p.suffix == ".onnx":
        return f"{VENDOR}.onnx.model.v1"
    if rel.endswith(".onnx.data"):
        return f"{VENDOR}.onnx.data.v1"
    if p.suffix == ".gguf":
        return f"{VENDOR}.gguf.model.v1"
    if rel == "recipe.yaml":
        return f"{VENDOR}.recipe.v1+yaml"
    if rel == "report.md":
        return f"{VENDOR}.report.v1+markdown"
    if rel == "build/build_spec.json":
        return f"{VENDOR}.trt.buildspec.v1+json"
    if rel == "build/build_engine.sh":
        return f"{VENDOR}.trt.buildscript.v1+x-sh"
    if p.parts[:2] == ("build", "golden"):
        return f"{VENDOR}.golden.v1+json"
    if p.parts[:2] == ("build", "engines"):
        if p.suffix == ".plan":
            return f"{VENDOR}.trt.engine.v1"
        return {"timing.cache": f"{VENDOR}.trt.timingcache.v1",
                "engine.json": f"{VENDOR}.trt.engineinfo.v1+json"}.get(p.name, f"{VENDOR}.trt.buildlog.v1")
    if p.parts[0] == GENERATION:
        return f"{VENDOR}.generation.v1"
    if p.parts[0] in (PREPROCESSOR, TEXT_TOKENIZER):
        return f"{VENDOR}.preprocessor.v1"
    if p.suffix == ".png":
        return "image/png"
    return f"{VENDOR}.file.v1"


def deployable_files(run_dir: Path) -> list[str]:
    """The files push uploads, once the folder holds exactly what its manifest.json declares (export/artifact.py)."""
    return pushed_files(run_dir, parse_declared((run_dir / "manifest.json").read_bytes(), str(run_dir)))


def _annotations(run_dir: Path, rel: str, manifest: dict) -> dict:
    a = {TITLE: rel}
    onnx = manifest.get("onnx") or {}
    if rel == "model.onnx":
        a[f"{ANNOTATION}.onnx.opset"] = str(onnx.get("opset"))
        a[f"{ANNOTATION}.onnx.ir_version"] = str(onnx.get("ir_version"))
        weights = (onnx.get("tensorrt") or {}).get("weights", {}).get("bytes_by_type", {})
        a[f"{ANNOTATION}.onnx.weight_types"] = ",".join(sorted(weights))
    elif rel == "recipe.yaml":
        a[f"{ANNOTATION}.recipe.sha256"] = manifest["recipe"]["sha256"]
    elif rel == "build/build_spec.json":
        graphs = json.loads((run_dir / rel).read_text())["graphs"]
        a[f"{ANNOTATION}.trtexec"] = "; ".join(" ".join(g["trtexec"]) for g in graphs)
    elif rel.startswith("build/engines/"):
        info = run_dir / PurePosixPath(rel).parent / "engine.json"
        if info.is_file():
            e = json.loads(info.read_text())
            a[f"{ANNOTATION}.engine.key"] = e["key"]
            a[f"{ANNOTATION}.engine.compatibility"] = json.dumps(
                {k: e.get(k) for k in ("tensorrt", "compute_capability", "gpu", "platform", "l4t")}, sort_keys=True)
    return a


def _manifest_annotations(manifest: dict) -> dict:
    onnx = manifest.get("onnx") or {}
    trt = onnx.get("tensorrt") or {}
    metrics = {"onnx_parity_max_rel_err": (onnx.get("parity") or {}).get("max_rel_err"),
               **((manifest.get("evaluation") or {}).get("comparison") or {})}
    return {TITLE: manifest["name"], "org.opencontainers.image.created": manifest["created"],
            f"{ANNOTATION}.model.source": manifest["model"]["source"],
            f"{ANNOTATION}.model.sha256": manifest["model"]["sha256"],
            f"{ANNOTATION}.recipe.sha256": manifest["recipe"]["sha256"],
            f"{ANNOTATION}.metrics": json.dumps(metrics, sort_keys=True, default=str),
            f"{ANNOTATION}.target": str(trt.get("target")), f"{ANNOTATION}.tensorrt": str(trt.get("tensorrt"))}


# -- push and pull ------------------------------------------------------------------------------

def _descriptor(path: Path, media_type: str, annotations: dict | None = None) -> dict:
    d = {"mediaType": media_type, "digest": f"sha256:{sha256_path(path)}", "size": path.stat().st_size}
    if annotations:
        d["annotations"] = annotations
    return d


def push(run_dir: str | Path, ref: str) -> dict:
    run_dir, r = Path(run_dir), _ref(ref)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RecipeError(f"no manifest.json in '{run_dir}' (is it a finished run folder?)", field="RUN_DIR")
    raw = manifest_path.read_bytes()
    declared = parse_declared(raw, str(run_dir))
    manifest = json.loads(raw)
    files = pushed_files(run_dir, declared)
    layers = [(run_dir / rel, _descriptor(run_dir / rel, _media_type(rel), _annotations(run_dir, rel, manifest)))
              for rel in files]
    for rel, (_, d) in zip(files, layers):
        check_digest(run_dir, rel, d["digest"], declared, "RUN_DIR")
    config = _descriptor(manifest_path, CONFIG_MEDIA_TYPE)
    oci = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [d for _, d in layers],
           "annotations": _manifest_annotations(manifest)}
    body = json.dumps(oci).encode()  # the bytes (and so the digest) requests sends for json=oci
    store = _store(r)
    uploaded = 0
    for path, d in [(manifest_path, config), *layers]:
        if not store.has_blob(d):
            store.put_blob(path, d)
            uploaded += 1
    store.put_manifest(oci, body, r.tag)
    return {"ref": str(r), "digest": f"sha256:{hashlib.sha256(body).hexdigest()}", "files": len(files) + 1,
            "bytes": sum(d["size"] for _, d in layers) + config["size"], "uploaded_blobs": uploaded}


def pull(ref: str, dest: str | Path) -> dict:
    """Pull into a new folder: exactly the files manifest.json declares, each streamed no further than
    its declared size and checked against its sha256, moved into place only when all passed."""
    r, dest = _ref(ref), Path(dest)
    _check_dest(dest)
    store = _store(r)
    body, digest = store.manifest(r.tag)
    if digest is not None and f"sha256:{hashlib.sha256(body).hexdigest()}" != digest:
        raise RegistryError(f"the manifest of {r} does not match its digest {digest}; refusing it")
    oci = parse_oci(body, str(r))
    if oci.config.mediaType != CONFIG_MEDIA_TYPE or oci.config.size > MAX_CONFIG_BYTES:
        raise RegistryError(f"{r} is not an edgeprune artifact (its config blob is not a manifest.json); refusing it")
    layers = [(layer.annotations.get(TITLE, ""), layer) for layer in oci.layers]
    check_titles([t for t, _ in layers])
    partial = dest.parent / f".{dest.name}.partial"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _fetch_verified(store, oci.config, partial / "manifest.json", "manifest.json")
        declared = parse_declared((partial / "manifest.json").read_bytes(), str(r))
        check_layers(layers, declared)
        for title, layer in layers:
            _fetch_verified(store, layer, partial / title, title)
        for title, layer in layers:
            check_digest(partial, title, layer.digest, declared, None)
        script = partial / "build" / "build_engine.sh"
        if script.is_file():
            script.chmod(0o755)
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError):
            raise RegistryError(f"could not write the pulled files to '{dest}': {e.strerror or e}; pull into a "
                                "writable folder with enough space", field="DIR") from None
        raise
    return {"ref": str(r), "dest": str(dest), "files": len(layers) + 1,
            "bytes": oci.config.size + sum(layer.size for _, layer in layers),
            "engines": sum(title not in declared for title, _ in layers)}


def _check_dest(dest: Path) -> None:
    if dest.is_symlink():
        raise RecipeError(f"'{dest}' is a symbolic link; pull into a new folder", field="DIR")
    if dest.exists() and not dest.is_dir():
        raise RecipeError(f"'{dest}' is a file; pull into a new folder", field="DIR")
    if dest.is_dir() and any(dest.iterdir()):
        raise RecipeError(f"'{dest}' exists and is not empty; pull into a new folder", field="DIR")


def _fetch_verified(store, descriptor: Descriptor, out: Path, name: str) -> None:
    """Stream one blob into ``out``, reading no further than its declared size, then check its digest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with store.blob(descriptor.digest) as chunks, open(out, "wb") as f:
        for chunk in chunks:
            size += len(chunk)
            if size > descriptor.size:
                raise RegistryError(f"{name}: the registry sends more than the {descriptor.size} bytes the manifest "
                                    "declares; refusing the pull")
            h.update(chunk)
            f.write(chunk)
    got = f"sha256:{h.hexdigest()}"
    if got != descriptor.digest or size != descriptor.size:
        raise RegistryError(f"{name}: downloaded content has {got} ({size} bytes), the manifest "
                            f"says {descriptor.digest} ({descriptor.size} bytes); refusing the pull")


def _bounded(chunks, limit: int, what: str) -> bytes:
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes; refusing it")
    return bytes(data)


def _store(r: Ref):
    return _OciStore(r) if r.kind == "oci" else _FolderStore(r)


class _Index(BaseModel):
    model_config = ConfigDict(extra="allow")
    manifests: list[Descriptor]


class _FolderStore:
    """An OCI image layout per repository under a local folder."""

    def __init__(self, r: Ref):
        self.root = Path(r.location) / r.repo
        self.ref = r

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def has_blob(self, descriptor: dict) -> bool:
        """Present with the right content: a blob damaged on disk is uploaded again."""
        path = self._blob(descriptor["digest"])
        return path.is_file() and path.stat().st_size == descriptor["size"] and \
            f"sha256:{sha256_path(path)}" == descriptor["digest"]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:  # a folder this user may not write, or a full disk
            raise RegistryError(f"cannot write to {self.root}: {e.strerror or e}; the tag is as it was") from None

    def put_blob(self, path: Path, descriptor: dict) -> None:
        target = self._blob(descriptor["digest"])
        with self._writing():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_name(target)
            shutil.copyfile(path, tmp)
            tmp.replace(target)

    def put_manifest(self, manifest: dict, body: bytes, tag: str) -> None:
        with self._writing():
            self._tag(body, tag)
        self._drop_orphans()

    def _tag(self, body: bytes, tag: str) -> None:
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        blob = self._blob(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(blob)
        tmp.write_bytes(body)
        tmp.replace(blob)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_atomic(self.root / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}))
            index_path = self.root / "index.json"
            index = self._index().model_dump(mode="json", exclude_unset=True) if index_path.is_file() else \
                {"schemaVersion": 2, "manifests": []}
            index["manifests"] = [m for m in index["manifests"]
                                  if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
            index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                                       "annotations": {"org.opencontainers.image.ref.name": tag}})
            write_atomic(index_path, json.dumps(index, indent=1))

    def _drop_orphans(self) -> None:
        """Temp files of pushes that were killed: their process, on this host, no longer runs."""
        for tmp in (self.root / "blobs" / "sha256").glob(f".*{_TEMP}*"):
            pid, _, host = tmp.name.partition(_TEMP)[2].partition("-")
            if pid.isdigit() and not alive(int(pid), host):
                tmp.unlink(missing_ok=True)

    def _index(self) -> _Index:
        path = self.root / "index.json"
        if not path.is_file():
            return _Index(manifests=[])
        try:
            return _Index.model_validate_json(path.read_bytes())
        except ValidationError:
            raise RegistryError(f"{path} is not a valid OCI index; repair or remove it") from None

    def manifest(self, tag: str) -> tuple[bytes, str]:
        for m in self._index().manifests:
            if m.annotations.get("org.opencontainers.image.ref.name") == tag:
                path = self._blob(m.digest)
                if not path.is_file():
                    raise RegistryError(f"{self.ref}: manifest blob {m.digest} is missing")
                with open(path, "rb") as f:
                    return _bounded(iter(lambda: f.read(CHUNK), b""), MAX_MANIFEST_BYTES, f"the manifest of {self.ref}"), \
                        m.digest
        raise RegistryError(f"no tag '{tag}' in {self.root}")

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[Iterator[bytes]]:
        path = self._blob(digest)
        if not path.is_file():
            raise RegistryError(f"{self.ref}: blob {digest} is missing")
        with open(path, "rb") as f:
            yield iter(lambda: f.read(CHUNK), b"")


_TEMP = ".tmp-"


def _temp_name(target: Path) -> Path:
    """Beside ``target``, named after this process so that `_FolderStore._drop_orphans` knows when it is dead."""
    return target.with_name(f".{target.name}{_TEMP}{os.getpid()}-{socket.gethostname()}")


class _OciStore:
    """A remote registry through oras-py's Registry, with bounded requests and env credentials."""

    def __init__(self, r: Ref):
        import oras.provider

        self.ref = r
        insecure = r.location.startswith(_LOOPBACK) or os.environ.get("EDGEPRUNE_REGISTRY_INSECURE") == "1"
        scheme = "http" if insecure else "https"
        try:
            ping = requests.get(f"{scheme}://{r.location}/v2/", timeout=TIMEOUT_S)
        except requests.RequestException as e:
            raise RegistryError(f"registry {r.location} is unreachable: {type(e).__name__}") from None
        challenge = ping.headers.get("WWW-Authenticate", "")
        backend = "basic" if challenge.lower().startswith("basic") else "token"
        self.registry = oras.provider.Registry(hostname=r.location, insecure=insecure, auth_backend=backend)
        adapter = _TimeoutAdapter()
        self.registry.session.mount("http://", adapter)
        self.registry.session.mount("https://", adapter)
        user, password = os.environ.get("EDGEPRUNE_REGISTRY_USER"), os.environ.get("EDGEPRUNE_REGISTRY_PASSWORD")
        if user and password:
            self.registry.auth.set_basic_auth(user, password)
        elif ping.status_code == 401 and backend == "basic":  # token registries may still grant anonymous pulls
            raise RegistryError(f"registry {r.location} needs credentials: set EDGEPRUNE_REGISTRY_USER and "
                                "EDGEPRUNE_REGISTRY_PASSWORD")
        self.container = self.registry.get_container(f"{r.repo}:{r.tag}")

    @contextlib.contextmanager
    def _errors(self, what: str):
        """oras-py reports refusals as ValueError (e.g. no upload session without valid credentials)."""
        try:
            yield
        except (ValueError, requests.RequestException) as e:
            raise RegistryError(f"{what} failed on {self.ref}: {e}") from None

    def _check(self, response, what: str):
        if response.status_code not in (200, 201, 202):
            raise RegistryError(f"{what} failed on {self.ref}: HTTP {response.status_code} {response.reason}")
        return response

    def has_blob(self, descriptor: dict) -> bool:
        with self._errors("checking a blob"):
            return self.registry.blob_exists(descriptor, self.container)

    def put_blob(self, path: Path, descriptor: dict) -> None:
        with self._errors(f"uploading {path.name}"):
            self._check(self.registry.upload_blob(str(path), self.container, descriptor), f"uploading {path.name}")

    def put_manifest(self, manifest: dict, body: bytes, tag: str) -> None:
        with self._errors("uploading the manifest"):
            response = self._check(self.registry.upload_manifest(manifest, self.container), "uploading the manifest")
        sent = response.request.body
        if sent is not None and sent != body:  # our digest must be the one the registry stored
            raise RegistryError("the manifest was serialised differently than expected; not verified")

    def manifest(self, tag: str) -> tuple[bytes, str | None]:
        url = f"{self.registry.prefix}://{self.container.manifest_url(tag)}"
        with self._errors("reading the manifest"):
            with self.registry.do_request(url, "GET", headers={"Accept": OCI_MANIFEST}, stream=True) as response:
                if response.status_code == 404:
                    raise RegistryError(f"no tag '{tag}' in {self.ref.location}/{self.ref.repo}")
                self._check(response, "reading the manifest")
                body = _bounded(response.iter_content(CHUNK), MAX_MANIFEST_BYTES, f"the manifest of {self.ref}")
                return body, response.headers.get("Docker-Content-Digest")

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[Iterator[bytes]]:
        with self._errors(f"downloading {digest}"):
            with self.registry.get_blob(self.container, digest, stream=True) as response:
                self._check(response, f"downloading {digest}")
                yield response.iter_content(CHUNK)


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """oras-py sends requests without a timeout; bound every one of them."""

    def send(self, request, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or TIMEOUT_S
        return super().send(request, **kwargs)
