"""Progress bars: fields given with a step (a training loss) reach the bar and events.jsonl."""

from __future__ import annotations

import io
import json

from rich.console import Console

from core.events import Events


def test_advance_fields_are_shown_and_recorded(tmp_path):
    events = Events(tmp_path / "events.jsonl", Console(file=io.StringIO()))
    bar = events.task("distill 2 steps", total=2)
    bar.advance(1, loss=0.25)
    shown = events._progress.tasks[0].description
    bar.advance(1)
    events.close()
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert shown == "distill 2 steps loss 0.25"
    assert [r.get("loss") for r in records] == [None, 0.25, None]
    assert all(r["task"] == "distill 2 steps" for r in records)
