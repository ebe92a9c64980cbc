"""An exclusive lock on an output folder, so that two `meg-harness` processes never write the same results.

:func:`output_lock` holds ``fcntl.flock`` on ``<folder>/.meg-harness.lock`` for the run's lifetime and writes
its holder (pid, host, command, start time) into that file. A second process is refused at once with a
:class:`HarnessError` naming the holder, and writes nothing. The operating system releases the lock when the
holder exits, also after ``kill -9`` (a stale lock file is then simply locked again by the next run). A lock
is re-entrant within one process. POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from meg_harness.errors import HarnessError

LOCK_FILE = ".meg-harness.lock"
_held: dict[Path, int] = {}  # lock file -> how many times this process holds it


def describe_holder(text: str) -> str:
    """The holder recorded in a lock file, in words (``"unknown"`` when it is not written yet)."""
    try:
        holder = json.loads(text)
        return (
            f"pid {holder['pid']} on {holder['host']}, started {holder['started']}, "
            f"command: {holder['command']}"
        )
    except (ValueError, KeyError, TypeError):
        return "unknown (no holder recorded yet)"


def _holder_record() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )


def _acquire(path: Path) -> int:
    """An fd of ``path`` holding its exclusive lock, or a HarnessError naming the holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
                holder = describe_holder(handle.read())
            raise HarnessError(
                f"is in use by another meg-harness process ({holder}); wait for it to finish or use "
                "another --out",
                file=path.parent,
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder before us may have removed the file after we opened it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created when missing) for the ``with`` block.

    On exit the lock file is removed, and so is ``folder`` when this call created it and nothing else was
    written into it (a run refused before writing leaves no trace). Yields the lock file's path.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / LOCK_FILE).resolve()
    if _held.get(path):
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    fd = _acquire(path)
    _held[path] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder_record() + "\n").encode(), 0)
        yield path
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: a process that opened it meanwhile sees the inode change
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
