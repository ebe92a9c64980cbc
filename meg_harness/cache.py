"""On-disk cache keyed by content hash, and the atomic file writing every module uses (temp file beside
the target, then rename): :func:`atomic_path`, :func:`atomic_write_text`, :func:`atomic_write_bytes`;
:func:`exclusive` lets one process compute an entry while another that needs it waits."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``$MEG_HARNESS_CACHE`` or ``~/.cache/meg_harness``."""
    return Path(os.environ.get("MEG_HARNESS_CACHE") or Path.home() / ".cache" / "meg_harness").expanduser()


def content_hash(*parts: Any) -> str:
    """A stable sha256 hex digest of JSON-serialisable parts."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None, suffix: str = ".tmp") -> Iterator[Path]:
    """The one way files are written atomically: a temporary path beside ``path`` (its folder is created) to
    write to, renamed over ``path`` when the block ends without error, removed when it raises; a reader never
    sees a partial ``path``. ``mode``: the file's permissions (the temporary file starts private, 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created) for the block, waiting while another process
    holds it: two runs that need the same expensive cache entry compute it once (the second re-reads the
    cache inside the block). The operating system releases the lock when its holder exits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`; ``mode``: its permissions)."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


class JsonCache:
    """A folder of JSON entries under ``root/namespace``, one file per key."""

    def __init__(self, root: Path | None, namespace: str) -> None:
        self.folder = Path(root or default_cache_dir()) / namespace

    def get(self, key: str) -> Any | None:
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def put(self, key: str, value: Any) -> None:
        atomic_write_text(self.folder / f"{key}.json", json.dumps(value, ensure_ascii=False))
