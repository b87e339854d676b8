"""Dependencies run one way: core < models < calibration < tasks < methods < export < evaluation < stages < pipeline.

Every import statement of the project's packages counts, also the ones inside functions (a lazy
import hides a cycle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "models", "calibration", "tasks", "methods", "export", "evaluation", "stages", "pipeline")
STAGE_INFRASTRUCTURE = ("stages", "stages.base", "stages.context")  # what stage modules may share


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The project module an import names (the longest known prefix), or None for third-party ones."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names]  # `from pkg import module` names a module
        else:
            continue
        found |= {m for m in (_resolve(n, known) for n in names) if m is not None and m != module}
    return found


def graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, ds in edges.items() for d in ds if layer(d) > layer(m))


def stage_to_stage(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, ds in edges.items() if m.startswith("stages.")
                  and m not in STAGE_INFRASTRUCTURE for d in ds
                  if d.startswith("stages") and d not in STAGE_INFRASTRUCTURE[1:])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state = [], {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_upward_import():
    assert upward(graph()) == []


def test_no_cycle():
    assert cycles(graph()) == []


def test_stages_never_import_stages():
    assert stage_to_stage(graph()) == []


def test_the_checks_catch_what_they_look_for():
    """The checkers themselves on a made-up graph: a cycle, an upward edge and a stage import."""
    edges = {"core.a": {"models.b"}, "models.b": {"core.a"}, "stages.x": {"stages.y", "stages.base"},
             "stages.y": set(), "stages.base": set()}
    assert cycles(edges) == [["core.a", "models.b", "core.a"]]
    assert upward(edges) == ["core.a imports models.b"]
    assert stage_to_stage(edges) == ["stages.x imports stages.y"]


@pytest.mark.parametrize("package", LAYERS)
def test_every_layer_exists(package):
    assert (ROOT / package / "__init__.py").is_file()
