"""On-disk cache keyed by content hash; entries are written atomically (temp file, then rename)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``$MEG_HARNESS_CACHE`` or ``~/.cache/meg_harness``."""
    return Path(os.environ.get("MEG_HARNESS_CACHE") or Path.home() / ".cache" / "meg_harness").expanduser()


def content_hash(*parts: Any) -> str:
    """A stable sha256 hex digest of JSON-serialisable parts."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a partial file (``mode``: its permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
