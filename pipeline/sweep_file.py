"""A sweep file: one base recipe and the overrides that make each run of `python -m pipeline sweep`.

    recipe: ../recipes/default.yaml      # the base recipe, relative to this file
    output: sweeps/minilm                # the sweep folder, relative to this file
    grid:                                # every combination (cartesian product), or instead
      stages[prune_structured].ratio: [0.1, 0.3]
      stages[distill]: [false, true]     # false (or null) removes the stage, true keeps it, a mapping replaces it
    # runs:                              # a list of runs, each a name (optional) and its overrides
    #   - {name: light, stages[1].ratio: 0.1}
    resources: {cpus: 1, gpus: 0, memory: 4GiB}   # what each run asks of Ray

An override key is a dotted path into the recipe (``evaluation.latency.iterations``); a stage is
``stages[N]`` (its index in the base recipe) or ``stages[LABEL]`` (its name, or its type when only
one stage has it). Every key is checked against the recipe schema before anything runs, and every
expanded recipe is validated as ``run`` would. A run's name comes from its overrides
(``ratio0.1-no-distill``): deterministic, filesystem-safe, and unique within the sweep.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from core.echo import quote
from core.errors import RecipeError
from core.spec import Section

from .recipe import _SECTIONS, Recipe, Slug, _to_recipe_error, parse_recipe, resolve_paths
from .recipe_file import read_recipe_file

MAX_RUNS = 1000
MAX_NAME = 60
_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[([^\]]+)\]")
_SLUG = TypeAdapter(Slug)
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


class Resources(Section):
    """What each run asks the Ray scheduler for (``--serial`` ignores it): CPUs (also its PyTorch
    threads), GPUs and memory (bytes, or a string with a unit: ``4GiB``, ``512MiB``)."""

    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)
    memory: int | str | None = None

    @field_validator("memory")
    @classmethod
    def _bytes(cls, v: int | str | None) -> int | None:
        if v is None or isinstance(v, int):
            return v
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", v)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError("give bytes, or a number with a unit: KiB, MiB, GiB, KB, MB, GB (e.g. 4GiB)")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class SweepSpec(Section):
    recipe: str = Field(min_length=1)
    output: str = Field(min_length=1)
    grid: dict[str, list[Any]] | None = None
    runs: list[dict[str, Any]] | None = None
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _one_form(self):
        if (self.grid is None) == (self.runs is None):
            raise ValueError("give either 'grid' (keys -> lists of values) or 'runs' (a list of overrides)")
        if self.grid is not None and (not self.grid or any(not v for v in self.grid.values())):
            raise ValueError("'grid' needs at least one key, each with a non-empty list of values")
        if self.runs is not None and not self.runs:
            raise ValueError("'runs' needs at least one entry")
        return self


@dataclass
class Job:
    """One run of the sweep: its name, the overrides that made it and its validated recipe."""

    name: str
    overrides: dict[str, Any]
    recipe: Recipe


@dataclass
class Sweep:
    path: Path
    spec: SweepSpec
    output: Path
    jobs: list[Job]


def load_sweep(path: str | Path) -> Sweep:
    """The sweep file, its overrides checked against the schema and every run's recipe validated; nothing is
    written and no model is loaded (each recipe is planned by the caller)."""
    path = Path(path)
    raw = read_recipe_file(path)
    if not isinstance(raw, dict):
        raise RecipeError("a sweep file is a mapping with keys recipe, output, grid or runs, resources", field="sweep")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise _to_recipe_error(e, SweepSpec, "") from None
    base_path = path.resolve().parent / spec.recipe
    base = read_recipe_file(base_path)
    try:
        parse_recipe(copy.deepcopy(base))  # the base itself is valid before any override is read
    except RecipeError as e:
        raise RecipeError(f"the base recipe {quote(str(base_path))}: {e.message}", field=e.field) from None
    entries = _entries(spec)
    if len(entries) > MAX_RUNS:
        raise RecipeError(f"{len(entries)} runs; a sweep holds at most {MAX_RUNS}: split it",
                          field="grid" if spec.grid is not None else "runs")
    stages = base["stages"]
    for where, overrides, _ in entries:
        for key in overrides:
            check_key(key, stages, f"{where}.{key}")
    names = _names(entries, stages)
    jobs = [Job(name, overrides, _recipe(base, overrides, name, base_path.parent))
            for (_, overrides, _), name in zip(entries, names)]
    return Sweep(path, spec, (path.resolve().parent / spec.output).resolve(), jobs)


def _entries(spec: SweepSpec) -> list[tuple[str, dict[str, Any], str | None]]:
    """(where, overrides, given name) for every run, in the file's order."""
    if spec.grid is not None:
        keys = list(spec.grid)
        return [("grid", dict(zip(keys, values)), None) for values in itertools.product(*spec.grid.values())]
    out = []
    for i, item in enumerate(spec.runs or []):
        overrides = {k: v for k, v in item.items() if k != "name"}
        name = item.get("name")
        if name is not None:
            try:
                name = _SLUG.validate_python(name)
            except ValidationError:
                raise RecipeError(f"{quote(name)} is not allowed: letters, digits, '.', '_', '-' (100 at most)",
                                  field=f"runs[{i}].name") from None
        out.append((f"runs[{i}]", overrides, name))
    return out


def tokens(key: str, where: str) -> list[str | int]:
    """``stages[1].ratio`` -> ["stages", 1, "ratio"]; a malformed key is one error naming it."""
    out: list[str | int] = []
    for part in key.split("."):
        pos = 0
        while pos < len(part) or not part:
            m = _TOKEN.match(part, pos)
            if m is None or (m.group(1) and pos > 0):
                raise RecipeError("not a recipe key: use dotted names, stages[N] or stages[LABEL] "
                                  "(e.g. stages[1].ratio, evaluation.num_samples)", field=where)
            out.append(m.group(1) or (int(m.group(2)) if m.group(2).isdigit() else m.group(2)))
            pos = m.end()
    return out


def check_key(key: str, stages: list, where: str) -> None:
    """The key names a field of the recipe schema (a section's, or the addressed stage's arguments)."""
    path = tokens(key, where)
    head = path[0]
    if head == "name":
        raise RecipeError("the sweep names each run from its overrides: remove 'name'", field=where)
    if head not in Recipe.model_fields:
        allowed = ", ".join(k for k in Recipe.model_fields if k != "name")
        raise RecipeError(f"unknown key {quote(head)}; allowed first keys: {allowed}", field=where)
    if head != "stages":
        _walk(_SECTIONS.get(str(head)), path[1:], str(head), where)
        return
    if len(path) < 2:
        raise RecipeError("address one stage: stages[N] or stages[LABEL], then its key (stages[1].ratio)", field=where)
    from stages import REGISTRY

    stage = stages[stage_index(stages, path[1], where)]
    _walk(REGISTRY[stage["type"]].Args, path[2:], f"stage {stage['type']}", where)


def stage_index(stages: list, ref: str | int, where: str) -> int:
    """The index of the base recipe's stage that ``stages[ref]`` addresses (by index, name or unique type)."""
    if isinstance(ref, int):
        if ref >= len(stages):
            raise RecipeError(f"stages[{ref}] does not exist: the base recipe has {len(stages)} stages "
                              f"(0 to {len(stages) - 1})", field=where)
        return ref
    hits = [i for i, s in enumerate(stages) if s.get("name") == ref] or \
        [i for i, s in enumerate(stages) if s.get("type") == ref and not s.get("name")]
    if len(hits) != 1:
        labels = ", ".join(s.get("name") or s["type"] for s in stages)
        what = "no stage" if not hits else f"{len(hits)} stages"
        raise RecipeError(f"{what} of the base recipe is labelled {quote(ref)}; use stages[N] or one of: {labels}",
                          field=where)
    return hits[0]


def _walk(cls: Any, rest: list[str | int], owner: str, where: str) -> None:
    """Follow ``rest`` through pydantic models (a union: any member's field counts)."""
    for part in rest:
        models = _models(cls)
        if not models:
            raise RecipeError(f"{owner} is a value, not a section: remove '.{part}'", field=where)
        fields = {k: f for m in models for k, f in m.model_fields.items()}
        if part not in fields:
            raise RecipeError(f"unknown key {quote(part)} for {owner}; allowed keys: {', '.join(fields)}", field=where)
        cls, owner = fields[str(part)].annotation, f"{owner}.{part}"


def _models(cls: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation may hold (unwrapping Optional, unions and Annotated)."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [cls]
    return [m for arg in typing.get_args(cls) for m in _models(arg)]


def _recipe(base: dict, overrides: dict[str, Any], name: str, folder: Path) -> Recipe:
    """The base recipe with ``overrides`` applied, named ``name`` and validated as ``run`` would."""
    raw = copy.deepcopy(base)
    raw["name"] = name
    removed: set[int] = set()
    for key, value in overrides.items():
        path = tokens(key, key)
        target: Any = raw
        if path[0] == "stages":
            i = stage_index(base["stages"], path[1], key)
            if len(path) == 2:
                if value is None or value is False:
                    removed.add(i)
                elif isinstance(value, dict):
                    raw["stages"][i] = copy.deepcopy(value)
                elif value is not True:
                    raise RecipeError(f"{quote(value)} is not allowed for a whole stage: true keeps it, false or null "
                                      "removes it, a mapping replaces it", field=key)
                continue
            target, path = raw["stages"][i], path[2:]
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[path[-1]] = copy.deepcopy(value)
    raw["stages"] = [s for i, s in enumerate(raw["stages"]) if i not in removed]
    try:
        return resolve_paths(parse_recipe(raw), folder)
    except RecipeError as e:
        raise RecipeError(f"run '{name}': {e.message}", field=e.field) from None


def _names(entries: list[tuple[str, dict[str, Any], str | None]], stages: list) -> list[str]:
    """Given names, else names from the overrides that tell the runs apart (a grid key with one value is in
    every run, so it is left out unless nothing else is left); two runs with one name are refused."""
    keys = list(dict.fromkeys(k for _, overrides, _ in entries for k in overrides))
    fixed = {k for k in keys if len({repr(o.get(k)) for _, o, _ in entries}) == 1 and len(entries) > 1}
    if fixed == set(keys):
        fixed = set()
    lasts = [str(tokens(k, k)[-1]) for k in keys if k not in fixed]
    clash = {x for x in lasts if lasts.count(x) > 1}
    names = [given or derive({k: v for k, v in overrides.items() if k not in fixed}, stages, clash)
             for _, overrides, given in entries]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise RecipeError(f"{entries[seen[name]][0]} and {entries[i][0]} are both named '{name}': give the runs "
                              "different overrides or names", field=entries[i][0])
        seen[name] = i
    return names


def derive(overrides: dict[str, Any], stages: list, clash: frozenset[str] | set[str] = frozenset()) -> str:
    """A short, filesystem-safe name from the overrides, in their order: the key's last part and the value
    (``ratio0.2``); a removed stage is ``no-LABEL``, a kept one ``LABEL``; a key whose last part two keys share keeps its parent
    too. Longer than 60 characters: cut, with a digest of the overrides for uniqueness."""
    parts = []
    for key, value in overrides.items():
        path = tokens(key, key)
        if path[0] == "stages" and len(path) == 2:
            label = stages[stage_index(stages, path[1], key)]["type"]
            parts.append(f"no-{label}" if value is None or value is False else
                         label if value is True else f"{label}-{_value(value)}")
            continue
        last = str(path[-1])
        if last in clash and len(path) > 1:
            parent = path[-2]
            if isinstance(parent, int) and path[0] == "stages":
                parent = stages[parent]["type"]
            last = f"{parent}.{last}"
        parts.append(f"{last}{_value(value)}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("._-") or "base"
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(repr(sorted(overrides.items(), key=str)).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9].rstrip('._-')}-{digest}"
    return name if name[0].isalnum() else f"r{name}"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None:
        return "none"
    if isinstance(v, dict):
        return hashlib.sha256(repr(sorted(v.items(), key=str)).encode()).hexdigest()[:6]
    if isinstance(v, list):
        return "+".join(map(_value, v))
    return str(v)

