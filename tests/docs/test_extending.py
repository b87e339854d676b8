"""docs/extending/*.md show real diffs: every new file they show is the file in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs" / "extending").glob("*.md"))
NEW_FILE = re.compile(r"^--- /dev/null\n\+\+\+ b/(?P<path>\S+)\n@@ -0,0 \+1,(?P<n>\d+) @@\n", re.M)


def new_files(text: str) -> list[tuple[str, str]]:
    """(path, content) of every new-file hunk of the ```diff blocks."""
    out = []
    for m in NEW_FILE.finditer(text):
        lines = text[m.end():].split("\n")[: int(m["n"])]
        assert all(line.startswith("+") for line in lines), f"{m['path']}: hunk shorter than its header says"
        out.append((m["path"], "\n".join(line[1:] for line in lines) + "\n"))
    return out


def test_the_four_families_are_documented():
    names = {p.stem for p in DOCS}
    assert {"model-family", "weight-criterion", "token-selector", "quantization-format"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.stem)
def test_shown_files_match_the_repository(doc):
    shown = new_files(doc.read_text())
    assert shown, f"{doc.name} shows no new-file diff"
    for path, content in shown:
        assert (ROOT / path).read_text() == content, f"{doc.name}: {path} differs from the repository"


def test_a_stale_diff_is_caught():
    text = "--- /dev/null\n+++ b/core/__init__.py\n@@ -0,0 +1,1 @@\n+stale\n"
    (path, content), = new_files(text)
    assert path == "core/__init__.py" and (ROOT / path).read_text() != content
