"""Method registries: one class per method, found by name, with its own typed arguments.

A family (weight criteria, token selectors, precision formats, ...) is a `Registry`; each member is
a class with a ``name`` and an ``Args`` pydantic model whose discriminator field (``method`` or
``format``) is ``Literal[name]``. Members register themselves with ``@REGISTRY.register`` in their
own module, and the family package imports its modules (`import_members`), so adding a method is
one new file. A stage turns a family into its recipe arguments with `stage_args`: one flat
pydantic model per member (the stage's common fields plus the member's own), as a discriminated
union, so the YAML stays ``{type: prune_weights, method: wanda, sparsity: 0.5}``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, Field, create_model

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, family: str, key: str):
        self.family, self.key = family, key  # key: the discriminator field of the members' Args
        self._members: dict[str, T] = {}

    def register(self, cls: T) -> T:
        name = cls.name  # type: ignore[attr-defined]
        if name in self._members:
            raise ValueError(f"{self.family} {name!r} is registered twice")
        tag = cls.Args.model_fields.get(self.key)  # type: ignore[attr-defined]
        if tag is None or getattr(tag.annotation, "__args__", None) != (name,):
            raise TypeError(f"{cls.__name__}.Args needs '{self.key}: Literal[{name!r}]'")
        self._members[name] = cls
        return cls

    def __getitem__(self, name: str) -> T:
        return self._members[name]

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def names(self) -> list[str]:
        return list(self._members)

    def members(self) -> dict[str, T]:
        return dict(self._members)


def import_members(package: str) -> None:
    """Import every module of ``package`` so their ``@register`` decorators run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")


def stage_args(registry: Registry, base: type[BaseModel]) -> Any:
    """The discriminated union of ``base`` (a stage's common fields) merged with each member's Args."""
    members = tuple(create_model(f"{base.__name__}_{name}", __base__=(cls.Args, base))
                    for name, cls in registry.members().items())
    if len(members) == 1:
        return members[0]
    return Annotated[Union[members], Field(discriminator=registry.key)]  # noqa: UP007 (a runtime tuple)
