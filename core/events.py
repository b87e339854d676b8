"""events.jsonl (one JSON object per event) and rich progress bars, from one call site.

Both pass through `core.echo.redact`: a credential that reached a value never reaches the log.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .echo import redact


class Events:
    def __init__(self, path: Path | None, console: Console | None = None):
        self.path = path
        self.console = console or Console(file=sys.stderr)
        self._progress: Progress | None = None
        self.stage: str | None = None

    def emit(self, event: str, **fields) -> None:
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), "event": event, "stage": self.stage, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(_redacted(record)) + "\n")

    def log(self, message: str) -> None:
        """``message`` may use rich markup; events.jsonl gets the plain text."""
        message = redact(message)
        self.console.print(message, highlight=False)
        self.emit("log", message=Text.from_markup(message).plain)

    def task(self, description: str, total: int) -> ProgressTask:
        if self._progress is None:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                      transient=False)
            self._progress.start()
        return ProgressTask(self, self._progress, description, total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _redacted(value):
    """A JSON-ready copy of ``value`` with every string redacted (objects become their str)."""
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


class ProgressTask:
    """One bar; its progress also goes to events.jsonl."""

    def __init__(self, events: Events, progress: Progress, description: str, total: int):
        self.events, self.progress, self.description, self.total = events, progress, description, total
        self.id = progress.add_task(description, total=total)
        self.completed = 0
        events.emit("progress", task=description, completed=0, total=total)

    def advance(self, n: int = 1, **fields) -> None:
        """``fields`` (a training loss, say) are shown after the description and recorded with the event."""
        self.completed += n
        shown = " ".join([self.description, *(f"{k} {v}" for k, v in fields.items())])
        self.progress.update(self.id, advance=n, description=shown)
        self.events.emit("progress", task=self.description, completed=self.completed, total=self.total, **fields)

    def doing(self, what: str) -> None:
        """Name the step now running, for a bar over a few long steps (export's trace, then its checks)."""
        self.progress.update(self.id, description=f"{self.description}: {what}")

    def done(self) -> None:
        if self.events._progress is self.progress:  # not closed since (an error ends the run's bars)
            self.progress.remove_task(self.id)
        self.events.console.print(f"  {self.description}: done", highlight=False)
