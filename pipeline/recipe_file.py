"""Reading a recipe file with bounded cost: size, encoding, and a strict subset of YAML.

A recipe is at most `MAX_BYTES` of UTF-8 text. The loader is PyYAML's safe loader minus what
makes a small file expensive or ambiguous: anchors and aliases are refused outright (a 600-byte
file of nested aliases expands to gigabytes once anything walks it, and a recipe never needs
them), mappings nest at most `MAX_DEPTH` levels, and a key given twice is an error instead of
the last value silently winning. Every problem is one `RecipeError` with the line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import CollectionStartEvent, NodeEvent

from core.echo import clip, quote
from core.errors import EnvironmentFailure, RecipeError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32


class _Refused(yaml.MarkedYAMLError):
    pass


class StrictLoader(yaml.SafeLoader):
    """No anchors or aliases, no duplicate keys, bounded nesting."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, NodeEvent) and event.anchor is not None:  # an alias names its anchor too
            raise _Refused(problem="YAML anchors and aliases (&name, *name) are not allowed in a recipe; "
                                   "write the values out", problem_mark=event.start_mark)
        nested = isinstance(event, CollectionStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nested

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise _Refused(problem=f"duplicate key {quote(key)}: give each key once", problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_recipe_file(path: Path) -> Any:
    """The parsed YAML of a recipe file (any YAML value; the schema checks its shape)."""
    if path.is_dir():
        raise RecipeError(f"{quote(str(path))} is a folder; give the recipe's YAML file", field="recipe")
    if not path.is_file():
        raise RecipeError(f"no such file {quote(str(path))}", field="recipe")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise EnvironmentFailure(f"cannot read {quote(str(path))}: {e.strerror}; give this user read permission",
                                 field="recipe") from None
    if len(data) > MAX_BYTES:
        raise RecipeError(f"the file is larger than {MAX_BYTES // 1024} KiB; a recipe is a short YAML file", field="recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the recipe as UTF-8",
                          field="recipe") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"not valid YAML{where}: {clip(str(problem))}", field="recipe") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise RecipeError(f"a value YAML cannot convert: {clip(str(e).split(';')[0])}", field="recipe") from None
