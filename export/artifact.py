"""What a pushed artifact is made of, and the checks that make it complete or refused.

A run folder's manifest.json declares every file of the run with its size and sha256
(``artifacts``). The artifact is the deployable part of that set (`deployable`: recipe, report and
the figures it links (``stages/*/*.png``), graphs, GGUF files, preprocessor/, generation/, text_tokenizer/
and build/;
not the checkpoint nor the rest of the per-stage bookkeeping),
with manifest.json itself as the OCI config blob. The one kind of file that may be there without
being declared is a TensorRT engine built later on the device by build/build_engine.sh, under
``build/engines/<key>/``: its plans must be the ones the engine.json beside them records.

- push refuses a folder in which a declared deployable file is missing or changed, or which holds
  a file its manifest.json does not declare (`pushed_files`, `check_digest`);
- pull refuses a malformed OCI manifest or manifest.json (`parse_oci`, `parse_declared`), a layer
  title that is not a plain relative path or collides with another (`check_titles`), and any
  difference between the layers and the declared deployable files (`check_layers`), all before it
  downloads anything besides manifest.json.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.echo import quote
from core.errors import PipelineError

TITLE = "org.opencontainers.image.title"
PREPROCESSOR = "preprocessor"  # the tokenizer or image processor config the graph's inputs need (export stage)
GENERATION = "generation"  # a decoder's generation config (export stage); its tokenizer is in preprocessor/
# TRIM's text graph's tokenizer: methods/tokens/text.py writes it (literal here, as text_encoder.onnx below, so that
# push/pull never import torch; tests/export/test_artifact.py checks the two names agree)
TEXT_TOKENIZER = "text_tokenizer"
ENGINES = "build/engines/"
_TOP = ("recipe.yaml", "report.md", "model.onnx", "decode.onnx", "model.onnx.data", "vision.onnx", "vision.onnx.data",
        "text_encoder.onnx")
_FOLDERS = (PREPROCESSOR, GENERATION, TEXT_TOKENIZER, "build", "stages")


class RegistryError(PipelineError):
    """A push or pull that could not complete (unreachable registry, digest mismatch, missing tag)."""

    exit_code = 1


class Descriptor(BaseModel):
    """An OCI content descriptor (fields besides these are allowed and ignored)."""

    model_config = ConfigDict(extra="allow")
    mediaType: str
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    size: int = Field(ge=0)
    annotations: dict[str, str] = {}


class OciManifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    schemaVersion: Literal[2]
    config: Descriptor
    layers: list[Descriptor]


class Declared(BaseModel):
    """One file manifest.json declares."""

    path: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


class _RunManifest(BaseModel):
    artifacts: list[Declared]


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def parse_oci(body: bytes, where: str) -> OciManifest:
    try:
        return OciManifest.model_validate_json(body)
    except ValidationError as e:
        raise RegistryError(f"the manifest of {where} is not a valid OCI image manifest ({_first_error(e)}); "
                            "refusing it") from None


def parse_declared(text: bytes, where: str) -> dict[str, Declared]:
    """The files a manifest.json declares, by path."""
    try:
        files = _RunManifest.model_validate_json(text).artifacts
    except ValidationError as e:
        raise RegistryError(f"{where}: manifest.json does not declare its files ({_first_error(e)})") from None
    declared = {d.path: d for d in files}
    if len(declared) != len(files):
        raise RegistryError(f"{where}: manifest.json declares a path twice")
    return declared


def deployable(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if not parts or any(p.startswith(".") for p in parts):
        return False
    if len(parts) == 1:
        return rel in _TOP or (rel.startswith("model-") and rel.endswith(".gguf"))
    if parts[0] == "stages":  # report.md's figures, so that its links work where it is pulled
        return len(parts) == 3 and rel.endswith(".png")
    return parts[0] in (PREPROCESSOR, GENERATION, TEXT_TOKENIZER, "build")


def _order(rel: str) -> tuple:
    """Top-level files first (graphs after recipe and report), then GGUF files, the folders, figures last."""
    if rel in _TOP:
        return 0, _TOP.index(rel), rel
    if "/" not in rel:
        return 1, 0, rel
    return 2, _FOLDERS.index(PurePosixPath(rel).parts[0]), rel


def pushed_files(run_dir: Path, declared: dict[str, Declared]) -> list[str]:
    """The files push uploads, after checking the folder holds exactly what manifest.json declares
    (engines built later excepted); their digests are `check_digest`'s."""
    present = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()} - {"manifest.json"}
    extra = sorted(r for r in present - declared.keys() if not r.startswith(ENGINES))
    if extra:
        raise RegistryError(f"{run_dir / extra[0]} is not among the files manifest.json declares ({len(extra)} such "
                            "files); remove them, or rerun the pipeline", field="RUN_DIR")
    wanted = [r for r in declared if deployable(r)]
    missing = [r for r in wanted if r not in present]
    if missing:
        raise RegistryError(f"{run_dir / missing[0]} is missing ({len(missing)} of the files manifest.json "
                            "declares); restore it, or rerun the pipeline", field="RUN_DIR")
    engines = [r for r in present - declared.keys() if deployable(r)]
    return sorted(wanted + engines, key=_order)


def check_digest(folder: Path, rel: str, digest: str, declared: dict[str, Declared], field: str | None) -> None:
    """A file's digest against what the run recorded: manifest.json, or for an engine plan built
    later, the engine.json beside it."""
    if rel in declared:
        expected = declared[rel].digest
    elif rel.endswith(".plan"):
        expected = _engine_digest(folder, rel)
        if expected is None:
            raise RegistryError(f"{rel} is not recorded in the engine.json beside it", field=field)
    else:
        return
    if digest != expected:
        raise RegistryError(f"{rel} changed after the run recorded its sha256 ({digest}, not {expected}); rerun "
                            "the pipeline or restore it", field=field)


def _engine_digest(folder: Path, rel: str) -> str | None:
    info = folder / PurePosixPath(rel).parent / "engine.json"
    try:
        engines = json.loads(info.read_text()).get("engines", [])
        return next((f"sha256:{e['sha256']}" for e in engines if e["plan"] == PurePosixPath(rel).name), None)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def check_titles(titles: list[str]) -> None:
    """Every layer title a plain relative path (no ``.``, ``..``, ``//``, leading ``/``), none twice,
    none manifest.json, none both a file and a folder."""
    for t in titles:
        if not t or PurePosixPath(t).as_posix() != t or t.startswith("/") or "\\" in t or "\0" in t or \
                any(part in (".", "..") for part in t.split("/")):
            raise RegistryError(f"artifact layer title {quote(t)} is not a plain relative path; refusing the pull")
        if t == "manifest.json":
            raise RegistryError("an artifact layer is titled manifest.json, which the config blob is; refusing the pull")
    if len(set(titles)) != len(titles):
        twice = next(t for t in titles if titles.count(t) > 1)
        raise RegistryError(f"two artifact layers are titled {quote(twice)}; refusing the pull")
    folders = {p.as_posix() for t in titles for p in PurePosixPath(t).parents}
    clash = sorted(folders & set(titles))
    if clash:
        raise RegistryError(f"artifact layer title {quote(clash[0])} is both a file and a folder; refusing the pull")


def check_layers(layers: list[tuple[str, Descriptor]], declared: dict[str, Declared]) -> None:
    """The layers are exactly the deployable files manifest.json declares, each with its digest and
    size (engines built later excepted: their plans are checked against engine.json once pulled)."""
    titles = {t for t, _ in layers}
    for title, layer in layers:
        d = declared.get(title)
        if d is None and not title.startswith(ENGINES):
            raise RegistryError(f"layer {quote(title)} is not among the files manifest.json declares; refusing the pull")
        if d is not None and (layer.digest, layer.size) != (d.digest, d.bytes):
            raise RegistryError(f"{title}: the layer ({layer.digest}, {layer.size} bytes) differs from manifest.json's "
                                f"({d.digest}, {d.bytes} bytes); refusing the pull")
    missing = [r for r in declared if deployable(r) and r not in titles]
    if missing:
        raise RegistryError(f"the artifact lacks {missing[0]} ({len(missing)} of the files manifest.json declares); "
                            "refusing the pull")
