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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests
import requests.adapters

from core.errors import PipelineError, RecipeError
from core.files import sha256_path, write_atomic

VENDOR = "application/vnd.edgeprune"
CONFIG_MEDIA_TYPE = f"{VENDOR}.manifest.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
ANNOTATION = "vnd.edgeprune"
TIMEOUT_S = 30  # every HTTP request: connect and read
_LOOPBACK = ("127.", "localhost", "[::1]")
GENERATION = "generation"  # a decoder's tokenizer files and generation config (written by the export stage)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_REPO = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


class RegistryError(PipelineError):
    """A push or pull that could not complete (unreachable registry, digest mismatch, missing tag)."""

    exit_code = 1


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
    return f"{VENDOR}.file.v1"


def deployable_files(run_dir: Path) -> list[str]:
    """The manifest's companions that make up the artifact: recipe, report, ONNX (a decoder's two graphs
    and what ``pipeline generate`` reads: tokenizer, chat template, generation config), GGUF files, build
    material, engines. Not the checkpoint (the ONNX is what deploys) nor the per-stage bookkeeping."""
    top = [n for n in ("recipe.yaml", "report.md", "model.onnx", "decode.onnx", "model.onnx.data")
           if (run_dir / n).is_file()]
    top += sorted(p.name for p in run_dir.glob("model-*.gguf"))
    folders = sorted(p.relative_to(run_dir).as_posix() for d in (GENERATION, "build") for p in (run_dir / d).rglob("*")
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts))
    return top + folders


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


def _check_unchanged(run_dir: Path, layers: list[tuple[Path, dict]], manifest: dict) -> None:
    """Refuse to push files that differ from what the run recorded (engines: from engine.json)."""
    recorded = {a["path"]: a["sha256"] for a in manifest.get("artifacts", [])}
    for _, d in layers:
        rel = d["annotations"][TITLE]
        expected = recorded.get(rel)
        if expected is None and rel.startswith("build/engines/") and rel.endswith(".plan"):
            info = run_dir / PurePosixPath(rel).parent / "engine.json"
            engines = json.loads(info.read_text()).get("engines", []) if info.is_file() else []
            expected = next((e["sha256"] for e in engines if e["plan"] == PurePosixPath(rel).name), None)
        if expected is not None and d["digest"] != f"sha256:{expected}":
            raise RegistryError(f"{rel} changed after the run recorded its sha256; rerun the pipeline or restore it",
                                field="RUN_DIR")


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
    manifest = json.loads(manifest_path.read_text())
    files = deployable_files(run_dir)
    layers = [(run_dir / rel, _descriptor(run_dir / rel, _media_type(rel), _annotations(run_dir, rel, manifest)))
              for rel in files]
    _check_unchanged(run_dir, layers, manifest)
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
    r, dest = _ref(ref), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise RecipeError(f"'{dest}' exists and is not empty; pull into a new folder", field="DIR")
    store = _store(r)
    body, digest = store.manifest(r.tag)
    if digest is not None and f"sha256:{hashlib.sha256(body).hexdigest()}" != digest:
        raise RegistryError(f"the manifest of {r} does not match its digest {digest}; refusing it")
    oci = json.loads(body)
    partial = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _fetch_verified(store, oci["config"], partial / "manifest.json", "manifest.json")
        recorded = {a["path"]: a["sha256"] for a in json.loads((partial / "manifest.json").read_text())
                    .get("artifacts", [])}
        for layer in oci["layers"]:
            rel = _safe_path(layer.get("annotations", {}).get(TITLE, ""))
            _fetch_verified(store, layer, partial / rel, rel)
            expected = recorded.get(rel)
            if expected is not None and f"sha256:{expected}" != layer["digest"]:
                raise RegistryError(f"{rel}: the artifact's digest {layer['digest']} differs from manifest.json's "
                                    f"sha256:{expected}; refusing the pull")
        script = partial / "build" / "build_engine.sh"
        if script.is_file():
            script.chmod(0o755)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.exists():
        dest.rmdir()
    partial.rename(dest)
    return {"ref": str(r), "dest": str(dest), "files": len(oci["layers"]) + 1}


def _safe_path(title: str) -> str:
    p = PurePosixPath(title)
    if not title or p.is_absolute() or ".." in p.parts or title == "manifest.json":
        raise RegistryError(f"artifact layer has an unsafe or missing title {title!r}; refusing the pull")
    return title


def _fetch_verified(store, descriptor: dict, out: Path, name: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    store.fetch_blob(descriptor["digest"], out)
    got = f"sha256:{sha256_path(out)}"
    if got != descriptor["digest"] or out.stat().st_size != descriptor["size"]:
        raise RegistryError(f"{name}: downloaded content has {got} ({out.stat().st_size} bytes), the manifest "
                            f"says {descriptor['digest']} ({descriptor['size']} bytes); refusing the pull")


def _store(r: Ref):
    return _OciStore(r) if r.kind == "oci" else _FolderStore(r)


class _FolderStore:
    """An OCI image layout per repository under a local folder."""

    def __init__(self, r: Ref):
        self.root = Path(r.location) / r.repo
        self.ref = r

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def has_blob(self, descriptor: dict) -> bool:
        """Present with the right size, as a registry's HEAD says; pull verifies the content."""
        path = self._blob(descriptor["digest"])
        return path.is_file() and path.stat().st_size == descriptor["size"]

    def put_blob(self, path: Path, descriptor: dict) -> None:
        target = self._blob(descriptor["digest"])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)

    def put_manifest(self, manifest: dict, body: bytes, tag: str) -> None:
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        blob = self._blob(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".{blob.name}.{os.getpid()}.tmp")
        tmp.write_bytes(body)
        tmp.replace(blob)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_atomic(self.root / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}))
            index_path = self.root / "index.json"
            index = json.loads(index_path.read_text()) if index_path.is_file() else {"schemaVersion": 2,
                                                                                     "manifests": []}
            index["manifests"] = [m for m in index["manifests"]
                                  if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
            index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                                       "annotations": {"org.opencontainers.image.ref.name": tag}})
            write_atomic(index_path, json.dumps(index, indent=1))

    def manifest(self, tag: str) -> tuple[bytes, str]:
        index_path = self.root / "index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {"manifests": []}
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                path = self._blob(m["digest"])
                if not path.is_file():
                    raise RegistryError(f"{self.ref}: manifest blob {m['digest']} is missing")
                return path.read_bytes(), m["digest"]
        raise RegistryError(f"no tag '{tag}' in {self.root}")

    def fetch_blob(self, digest: str, out: Path) -> None:
        path = self._blob(digest)
        if not path.is_file():
            raise RegistryError(f"{self.ref}: blob {digest} is missing")
        shutil.copyfile(path, out)


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
            response = self.registry.do_request(url, "GET", headers={"Accept": OCI_MANIFEST})
        if response.status_code == 404:
            raise RegistryError(f"no tag '{tag}' in {self.ref.location}/{self.ref.repo}")
        self._check(response, "reading the manifest")
        return response.content, response.headers.get("Docker-Content-Digest")

    def fetch_blob(self, digest: str, out: Path) -> None:
        with self._errors(f"downloading {digest}"):
            self.registry.download_blob(self.container, digest, str(out))


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """oras-py sends requests without a timeout; bound every one of them."""

    def send(self, request, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or TIMEOUT_S
        return super().send(request, **kwargs)
