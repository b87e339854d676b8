"""The recipe: one YAML file validated as a whole before any work starts.

Sections are pydantic models with ``extra="forbid"``; each stage's arguments are the typed model
its stage class declares (see ``stages.REGISTRY``). Every problem becomes one ``RecipeError``
naming the field (``stages[1].sparsity``) and what is allowed; a value is quoted by a short prefix and
nothing that looks like a credential is accepted (core/echo.py). The file itself is read by
recipe_file.py: bounded size, UTF-8, YAML without anchors, aliases or duplicate keys.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from calibration.spec import LOCAL_BUILDERS, CalibrationSpec
from core.echo import clip, quote, refuse_credentials
from core.errors import RecipeError
from core.spec import Section, check_device
from evaluation.spec import EvaluationSpec
from export.spec import ExportSpec
from models.spec import ModelSpec, hub_id_shaped

from .recipe_file import read_recipe_file

Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]


class PublishSpec(Section):
    """Where a finished run is pushed: a local folder registry ``DIR/REPO:TAG`` or
    ``oci://HOST[:PORT]/REPO:TAG``. Credentials come from the environment, never from here."""

    ref: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data):
        if isinstance(data, dict) and {"username", "user", "password", "token"} & set(data):
            raise ValueError("credentials are read from the environment (EDGEPRUNE_REGISTRY_USER, "
                             "EDGEPRUNE_REGISTRY_PASSWORD), never from the recipe")
        return data

    @field_validator("ref")
    @classmethod
    def _parse(cls, ref: str) -> str:
        from export.registry import parse_ref

        parse_ref(ref)
        return ref


class Recipe(Section):
    name: Slug
    model: ModelSpec
    calibration: CalibrationSpec = CalibrationSpec()
    stages: list[Any]
    export: ExportSpec = ExportSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    publish: PublishSpec | None = None
    device: str = "cpu"  # where PyTorch computes, for the whole run (core/device.py); run --device overrides it

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v: object) -> str:
        return check_device(v)

    def dump(self, include: set[str] | None = None) -> dict:
        """The resolved recipe as JSON values (defaults filled in). The settings that say where the run
        computes (``device``, ``evaluation.runtime``) are left out at their CPU defaults: a CPU run's
        recipe, its sha256 and its stages' fingerprints stay what they were before those settings
        existed, so its results and --resume are unchanged."""
        exclude: dict[str, Any] = {}
        if self.device == "cpu":
            exclude["device"] = True
        if self.evaluation.runtime == "cpu":
            exclude["evaluation"] = {"runtime"}
        return self.model_dump(mode="json", include=include, exclude=exclude)

    def to_yaml(self) -> str:
        """The resolved recipe, as saved in the run folder (`dump`)."""
        return yaml.safe_dump(self.dump(), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


_SECTIONS: dict[str, type[Section]] = {
    "model": ModelSpec,
    "calibration": CalibrationSpec,
    "export": ExportSpec,
    "evaluation": EvaluationSpec,
    "publish": PublishSpec,
}


RemoteCode = Literal["refuse", "allow", "skip"]


def load_recipe(path: str | Path, remote_code: RemoteCode = "refuse") -> Recipe:
    """The validated recipe of a file (see `parse_recipe` for ``remote_code``), its relative paths made
    absolute against the file's folder (`resolve_paths`)."""
    path = Path(path)
    return resolve_paths(parse_recipe(read_recipe_file(path), remote_code), path.resolve().parent)


def with_device(recipe: Recipe, device: str | None) -> Recipe:
    """The recipe with ``run --device`` in place of its ``device`` (None: the recipe's own)."""
    if device is None:
        return recipe
    try:
        return recipe.model_copy(update={"device": check_device(device)})
    except ValueError as e:
        raise RecipeError(f"{quote(device)} is not allowed: {e}", field="--device") from None


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative paths in a recipe file mean its folder, wherever the command runs. ``org/name`` stays a
    hub id unless ``base/org/name`` exists or ``base/org`` is a folder (then it is a path, and a missing
    one is reported as such)."""
    def local(p: str) -> str:
        return p if Path(p).expanduser().is_absolute() else str(base / p)

    source = recipe.model.source
    model = recipe.model
    if not source.startswith("package:") and not source.startswith("~") and not Path(source).is_absolute():
        path = base / source
        if not hub_id_shaped(source) or path.exists() or path.parent.is_dir():
            model = model.model_copy(update={"source": str(path)})
    sections = {"model": model}
    for key in ("calibration", "evaluation"):
        spec = getattr(recipe, key)
        update: dict[str, Any] = {}
        if spec.path is not None:
            update["path"] = local(spec.path)
        d = spec.dataset
        if d is not None and d.name in LOCAL_BUILDERS and d.data_files is not None:
            files = [local(f) for f in d.data_files] if isinstance(d.data_files, list) else local(d.data_files)
            update["dataset"] = d.model_copy(update={"data_files": files})
        sections[key] = spec.model_copy(update=update)
    stages = [_local_paths(args, local) for args in recipe.stages]
    return recipe.model_copy(update={**sections, "stages": stages})


def _local_paths(args: Any, local: Callable[[str], str]) -> Any:
    """A stage's path fields (its Args' ``path_fields``, e.g. TRIM's ``text_tower``) made absolute."""
    update = {f: local(getattr(args, f)) for f in getattr(args, "path_fields", ()) if getattr(args, f) is not None}
    return args.model_copy(update=update) if update else args


def parse_recipe(raw: Any, remote_code: RemoteCode = "refuse") -> Recipe:
    """Validate a parsed recipe. Everything but the stages' own arguments is checked before the
    stage registry (and with it torch) is imported, so most mistakes fail in well under a second.

    ``model.trust_remote_code: true`` runs Python code shipped with the model, so the recipe alone
    cannot grant it: ``remote_code`` is what the caller allows ("allow": ``run --trust-remote-code``;
    "skip": validate, which checks the model with its own code switched off; "refuse": anything else).
    """
    sections = _sections(raw, remote_code)
    from stages import REGISTRY  # the stage classes import torch; only needed once the rest is valid

    stages = []
    for i, item in enumerate(raw["stages"]):
        where = f"stages[{i}]"
        if item["type"] not in REGISTRY:
            raise RecipeError(f"unknown stage type {quote(item['type'])}; allowed: {', '.join(REGISTRY)}",
                              field=f"{where}.type")
        stages.append(_validate(REGISTRY[item["type"]].Args, item, where))
    try:
        recipe = Recipe(name=raw["name"], stages=stages, **sections,
                        **({"device": raw["device"]} if raw.get("device") is not None else {}))
    except ValidationError as e:
        raise _to_recipe_error(e, Recipe, "") from None
    _check_stage_order(recipe)
    _check_offload(recipe)
    return recipe


def _sections(raw: Any, remote_code: RemoteCode) -> dict[str, BaseModel]:
    """The checks that need no stage class: shape, secrets, top-level keys and every section."""
    if not isinstance(raw, dict):
        raise RecipeError("the recipe must be a mapping with keys name, model, stages, ...", field="recipe")
    _refuse_secrets(raw, "")
    allowed = list(Recipe.model_fields)
    for key in raw:
        if key not in allowed:
            raise RecipeError(f"unknown key; allowed keys: {', '.join(allowed)}", field=_key(key))
    for key in ("name", "model", "stages"):
        if raw.get(key) is None:
            raise RecipeError("required key is missing or empty", field=key)
    sections = {key: _validate(cls, raw[key], key) for key, cls in _SECTIONS.items() if raw.get(key) is not None}
    sections["model"] = _remote_code(typing.cast(ModelSpec, sections["model"]), remote_code)
    stages = raw["stages"]
    if not isinstance(stages, list) or not stages:
        raise RecipeError("must be a non-empty list of stages, each a mapping with a 'type'", field="stages")
    for i, item in enumerate(stages):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise RecipeError("each stage is a mapping with a 'type' (e.g. '- type: calibrate')", field=f"stages[{i}]")
    return sections


def _refuse_secrets(value: Any, field: str) -> None:
    """No credential enters a recipe: it would be echoed in errors and saved in the run folder."""
    if isinstance(value, str):
        refuse_credentials(value, field or "recipe")
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{field}.{_key(key)}" if field else _key(key)
            _refuse_secrets(str(key), sub)
            _refuse_secrets(item, sub)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_secrets(item, f"{field}[{i}]")


def _key(key: Any) -> str:
    """A key from the input as part of a field name: short, and visible when empty."""
    return clip(str(key), 40) or "''"


def _remote_code(model: ModelSpec, allowed: RemoteCode) -> ModelSpec:
    if not model.trust_remote_code or allowed == "allow":
        return model
    if allowed == "skip":
        return model.model_copy(update={"trust_remote_code": False})
    raise RecipeError("true runs Python code shipped with the model, which a recipe alone cannot allow: "
                      "pass --trust-remote-code to 'python -m pipeline run' (validate never runs it)",
                      field="model.trust_remote_code")


def _validate(cls: Any, data: Any, where: str) -> BaseModel:
    """Validate a section or a stage's arguments: a model, or a discriminated union of models
    (a method family, see core/registry.py), whose member the discriminator field picks."""
    if not isinstance(data, dict):
        raise RecipeError(f"must be a mapping, got {type(data).__name__}", field=where)
    try:
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls.model_validate(data)
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise _to_recipe_error(e, cls, where) from None


def _union_member(cls: Any, loc: list) -> tuple[type[BaseModel], list]:
    """For a discriminated union: the member a location starts in, and the location inside it."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return cls, loc
    union, discriminator = typing.get_args(cls)
    members = {typing.get_args(m.model_fields[discriminator.discriminator].annotation)[0]: m
               for m in typing.get_args(union)}
    return (members[loc[0]], loc[1:]) if loc and loc[0] in members else (next(iter(members.values())), loc)


def _union_tags(cls: Any) -> tuple[str, list[str]] | None:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return None
    union, discriminator = typing.get_args(cls)
    key = discriminator.discriminator
    return key, [typing.get_args(m.model_fields[key].annotation)[0] for m in typing.get_args(union)]


def _to_recipe_error(e: ValidationError, cls: Any, prefix: str) -> RecipeError:
    err = e.errors()[0]
    kind, value = err["type"], err.get("input")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key, tags = _union_tags(cls)
        field = f"{prefix}.{key}" if prefix else key
        text = (f"{quote(value.get(key))} is not allowed" if kind == "union_tag_invalid" else "required key is missing")
        return RecipeError(f"{text}; allowed: {', '.join(tags)}", field=field)
    cls, loc = _union_member(cls, list(err["loc"]))
    field = prefix
    for part in loc:
        field = f"{field}[{part}]" if isinstance(part, int) else (f"{field}.{_key(part)}" if field else _key(part))
    msg = clip(err["msg"])
    if kind == "extra_forbidden":
        owner = _owner(cls, loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else ""
        text = f"unknown key; allowed keys: {allowed}"
    elif kind == "missing":
        text = "required key is missing"
    elif kind.startswith(("greater", "less")):
        text = f"{quote(value)} is out of range: {msg[0].lower()}{msg[1:]}"
    elif kind == "value_error":
        text = msg.removeprefix("Value error, ")
    else:
        text = f"{quote(value)} is not allowed: {msg[0].lower()}{msg[1:]}"
    more = e.error_count() - 1
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return RecipeError(text, field=field or "recipe")


def _owner(cls: type[BaseModel], loc: list) -> type[BaseModel] | None:
    """The model class that owns the field at ``loc`` (for listing allowed keys)."""
    current: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
        args = getattr(current, "__args__", None)
        if args:  # Optional[Model] / list[Model]
            current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _check_stage_order(recipe: Recipe) -> None:
    """Rules that span stages: data before the stages that need it, export last among changes."""
    from stages import REGISTRY

    calibrated_at: int | None = None
    changed_since_calibration = False
    exported_at: int | None = None
    rewritten_at: int | None = None
    for i, args in enumerate(recipe.stages):
        stage_cls = REGISTRY[args.type]
        where = f"stages[{i}]"
        if args.type == "calibrate":
            calibrated_at, changed_since_calibration = i, False
        needs = stage_cls.needs_calibration(args)
        if needs and calibrated_at is None:
            raise RecipeError(
                f"stage '{args.type}' ({stage_cls.describe(args)}) needs calibration data: "
                "add '- type: calibrate' before it", field=where)
        if needs == "dense-statistics" and changed_since_calibration:
            raise RecipeError(
                f"stage '{args.type}' uses statistics of the model as calibrated at stages[{calibrated_at}], "
                "but an earlier stage changed the model since: add another '- type: calibrate' before it",
                field=where)
        if stage_cls.changes_model:
            changed_since_calibration = True
            if exported_at is not None:
                raise RecipeError(
                    f"stage '{args.type}' changes the model after it was exported at stages[{exported_at}]: "
                    "move 'export' after every stage that changes the model", field=where)
        if args.type == "export":
            if exported_at is not None:
                raise RecipeError("only one 'export' stage is allowed", field=where)
            exported_at = i
        if stage_cls.after_model_changes:
            changing = [later.type for later in recipe.stages[i + 1:] if REGISTRY[later.type].changes_model]
            if changing:
                raise RecipeError(f"'{changing[0]}' comes after {args.type}: put {args.type} after every stage that "
                                  "changes the model (it only changes the deployed graph)", field=where)
        replaced = stage_cls.replaces_outputs(args, recipe.model.task)
        comparing = [later.type for later in recipe.stages[i + 1:] if REGISTRY[later.type].compares_with_dense]
        if replaced and comparing:
            key = replaced.split()[0]
            raise RecipeError(f"'{comparing[0]}' compares task outputs with the dense model, and {args.type}'s "
                              f"{replaced} has no dense counterpart: remove '{comparing[0]}' or change '{key}'",
                              field=f"{where}.{key}")
        _check_grid(recipe, i)
        if stage_cls.rewrites_onnx:
            if exported_at is None:
                raise RecipeError(f"stage '{args.type}' rewrites the exported graph: put '- type: export' before it",
                                  field=where)
            if rewritten_at is not None:
                raise RecipeError(f"stages[{rewritten_at}] already set the graph's precision: keep one "
                                  f"'{args.type}' stage", field=where)
            rewritten_at = i


def _check_offload(recipe: Recipe) -> None:
    """``model.offload`` runs only stages that read weights block by block (Stage.offloads)."""
    from stages import REGISTRY

    if not recipe.model.offload:
        return
    for i, args in enumerate(recipe.stages):
        if not REGISTRY[args.type].offloads:
            ready = ", ".join(t for t, cls in REGISTRY.items() if cls.offloads)
            raise RecipeError(f"stage '{args.type}' needs the whole model in memory and cannot run with model.offload "
                              f"(offloaded runs take: {ready}); remove it or set model.offload: false",
                              field=f"stages[{i}]")


def _check_grid(recipe: Recipe, i: int) -> None:
    """A stage that tuned the weights for a grid (AWQ, GPTQ) needs a later stage rounding to that grid;
    one that left them on the grid (GPTQ) also needs nothing to change the model in between."""
    from stages import REGISTRY

    args = recipe.stages[i]
    stage_cls = REGISTRY[args.type]
    wanted = stage_cls.tuned_for_grid(args)
    if wanted is None:
        return
    fmts, group = wanted
    grid = " or ".join(fmts) + (f" group {group}" if group else "")
    applied = [(j, g) for j, s in enumerate(recipe.stages[i + 1:], i + 1)
               if (g := REGISTRY[s.type].weight_grid(s)) is not None]
    if not applied and recipe.model.offload:
        return  # an offloaded run ends at its checkpoint, weights on the grid, GPTQ's scales in its stage folder
    if not applied:
        raise RecipeError(f"stage '{args.type}' tunes the weights for {grid}: add '- {{type: quantize, format: "
                          f"{fmts[0]}" + (f", group_size: {group}" if group else "") + "}' after export",
                          field=f"stages[{i}]")
    j, (got_fmt, got_group) = applied[0]
    if got_fmt not in fmts:
        raise RecipeError(f"stage '{args.type}' at stages[{i}] tunes the weights for {grid}, not {got_fmt}",
                          field=f"stages[{j}].format")
    if got_group != group:
        raise RecipeError(f"stages[{j}] quantizes in groups of {got_group}, the weights were tuned for groups of "
                          f"{group}: use the same group_size in both", field=f"stages[{i}].group_size")
    moving = [k for k in range(i + 1, j) if REGISTRY[recipe.stages[k].type].changes_model]
    if stage_cls.keeps_grid and moving:
        k = moving[0]
        raise RecipeError(f"stage '{recipe.stages[k].type}' changes the model after stages[{i}] ({args.type}) put "
                          f"its weights on the {grid} grid, which stages[{j}] stores as they are: move it before "
                          f"{args.type}", field=f"stages[{k}]")
