"""One writer per output: a lock file holding its owner's pid and host, created with O_EXCL.

A second process that wants the same output refuses (`Locked`, exit code 1) instead of deleting
what the first is writing. A lock left by a process that died (kill -9, power loss) is stale: when
it names this host and a pid that no longer runs, the next process takes it over and says so. A
lock from another host cannot be checked from here, so it is refused, naming the file to delete
once that run is known to be gone (as is a lock whose pid was reused by another process). Taking
over happens under an flock of the folder holding the lock, so two processes never both take over
one stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import PipelineError


class Locked(PipelineError):
    """Another process holds the output (an environment condition: exit code 1)."""

    exit_code = 1


class FolderLock:
    """Context manager holding ``path`` for this process; ``what`` names the output in messages and
    ``note`` receives the line saying a stale lock was taken over."""

    def __init__(self, path: Path, what: str, field: str, note: Callable[[str], None]):
        self.path, self.what, self.field, self.note = path, what, field, note
        self.mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})

    def __enter__(self) -> FolderLock:
        if self._create():
            return self
        seen = self._read()
        if seen is None and self._create():  # released in between
            return self
        owner = _owner(seen)
        if owner is None or alive(*owner):
            raise Locked(self._held_by(owner), field=self.field)
        with _flocked(self.path.parent):
            if self._read() == seen:
                self.path.unlink()
            if self._create():
                self.note(f"took over the lock of process {owner[0]}, which is no longer running ({self.path})")
                return self
        raise Locked(self._held_by(_owner(self._read())), field=self.field)

    def __exit__(self, *exc) -> None:
        if self._read() == self.mine:
            self.path.unlink()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.mine)
        return True

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def _held_by(self, owner: tuple[int, str] | None) -> str:
        who = f"process {owner[0]} on {owner[1]}" if owner else "another process"
        return (f"{self.what} is being written by {who}; wait for it to finish, or delete {self.path} "
                "if that process is gone")


def _owner(text: str | None) -> tuple[int, str] | None:
    """(pid, host) of a lock's content; None for content that is not a lock (being written, or damaged)."""
    try:
        data = json.loads(text or "")
        return int(data["pid"]), str(data["host"])
    except (ValueError, TypeError, KeyError):
        return None


def alive(pid: int, host: str) -> bool:
    """Whether the owner may still run: always, for another host (nothing here can tell)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock tied to ``path`` (on the side file ``.NAME.flock`` beside it) while a cache
    entry is built: concurrent runs of a sweep (threads, processes, Ray workers on one host or on a shared
    file system with working locks) build a dense reference once and the others wait, then reuse it. The
    kernel drops the lock when its holder dies, so a killed builder never blocks the next; the side file
    stays (removing it would let two processes hold locks on two different files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held(os.open(path.parent / f".{path.name}.flock", os.O_RDWR | os.O_CREAT, 0o644)):
        yield


@contextlib.contextmanager
def _flocked(folder: Path) -> Iterator[None]:
    with _held(os.open(folder, os.O_RDONLY)):
        yield


@contextlib.contextmanager
def _held(fd: int) -> Iterator[None]:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
