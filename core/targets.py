"""llm-compressor's targets/ignore vocabulary: exact module name, ``re:`` regex, or class name.

Regexes use ``re.match`` (anchored at the start, as llm-compressor does); ignore wins over targets.
Each pattern is compiled once per `select`, not once per candidate layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .echo import clip, quote
from .errors import RecipeError

Matcher = Callable[[str, nn.Module], bool]


def _matcher(pattern: str, field: str) -> Matcher:
    if not pattern.startswith("re:"):
        return lambda name, module: pattern == name or pattern == type(module).__name__
    try:
        regex = re.compile(pattern[3:])
    except re.error as e:
        raise RecipeError(f"invalid regex {quote(pattern)}: {clip(str(e))}", field=field) from None
    return lambda name, module: regex.match(name) is not None


def select(candidates: dict[str, nn.Module], targets: list[str], ignore: list[str], field: str) -> dict[str, nn.Module]:
    """The candidates matched by some target and no ignore pattern; an empty result is an error."""
    wanted = [_matcher(p, f"{field}.targets[{i}]") for i, p in enumerate(targets)]
    unwanted = [_matcher(p, f"{field}.ignore[{i}]") for i, p in enumerate(ignore)]
    chosen = {n: m for n, m in candidates.items()
              if any(t(n, m) for t in wanted) and not any(u(n, m) for u in unwanted)}
    if not chosen:
        examples = ", ".join(list(candidates)[:3])
        raise RecipeError(f"no layer left after targets {quote(targets)} and ignore {quote(ignore)}; candidates look "
                          f"like: {examples}", field=f"{field}.targets")
    return chosen
