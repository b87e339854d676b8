"""llm-compressor's targets/ignore vocabulary: exact module name, ``re:`` regex, or class name.

Regexes use ``re.match`` (anchored at the start, as llm-compressor does); ignore wins over targets.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import RecipeError


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def select(candidates: dict[str, nn.Module], targets: list[str], ignore: list[str], field: str) -> dict[str, nn.Module]:
    """The candidates matched by some target and no ignore pattern; an empty result is an error."""
    for i, pattern in enumerate([*targets, *ignore]):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                which = f"targets[{i}]" if i < len(targets) else f"ignore[{i - len(targets)}]"
                raise RecipeError(f"invalid regex {pattern!r}: {e}", field=f"{field}.{which}") from None
    chosen = {n: m for n, m in candidates.items()
              if any(matches(n, m, t) for t in targets) and not any(matches(n, m, p) for p in ignore)}
    if not chosen:
        examples = ", ".join(list(candidates)[:3])
        raise RecipeError(f"no layer left after targets {targets} and ignore {ignore}; candidates look like: "
                          f"{examples}", field=f"{field}.targets")
    return chosen
