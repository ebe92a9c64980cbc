"""Text corpora for the second-moment statistics, streamed one sample at a time (never held in memory).

A corpus spec is ``default`` (the English text the package ships, one sample per line), a local ``.txt``
file (one sample per non-empty line) or ``.jsonl`` file (the ``text`` field of each line), or
``hf:<dataset>[:<config>[:<split>[:<field>]]]`` streamed from the Hugging Face hub with ``datasets``
(e.g. ``hf:wikitext:wikitext-103-raw-v1:train`` or ``hf:wikimedia/wikipedia:20231101.en:train``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from meg_harness.errors import HarnessError

DEFAULT = "default"
DEFAULT_FILE = "english.txt"


def _default_path():
    return resources.files("meg_harness.baselines").joinpath("corpus", DEFAULT_FILE)


def _lines(handle) -> Iterator[str]:
    for line in handle:
        line = line.strip()
        if line:
            yield line


def _jsonl(handle, path: Path) -> Iterator[str]:
    for number, line in enumerate(handle):
        if not line.strip():
            continue
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            raise HarnessError("not a JSON object with a 'text' field", file=path, record=number) from None
        if isinstance(text, str) and text.strip():
            yield text.strip()


def _hub(spec: str) -> Iterator[str]:
    parts = spec[len("hf:") :].split(":")
    name, config, split, field = (parts + [None, None, None])[:4]
    try:
        import datasets
    except ImportError:
        raise HarnessError(f"corpus {spec!r} needs the `datasets` package", field="mom2_dataset") from None
    try:
        stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as error:  # hub and dataset errors of every kind become one line
        raise HarnessError(f"cannot stream corpus {spec!r}: {error}", field="mom2_dataset") from None
    for record in stream:
        text = record.get(field or "text")
        if isinstance(text, str) and text.strip():
            yield text.strip()


def iter_corpus(spec: str, start: int = 0) -> Iterator[str]:
    """The samples of corpus ``spec`` from index ``start`` on, lazily."""
    if spec.startswith("hf:"):
        yield from itertools.islice(_hub(spec), start, None)
        return
    if spec == DEFAULT:
        with _default_path().open(encoding="utf-8") as handle:
            yield from itertools.islice(_lines(handle), start, None)
        return
    path = Path(spec).expanduser()
    if not path.is_file():
        raise HarnessError("corpus file not found (use 'default', a .txt/.jsonl file or hf:...)", file=path)
    with path.open(encoding="utf-8") as handle:
        samples = _jsonl(handle, path) if path.suffix == ".jsonl" else _lines(handle)
        yield from itertools.islice(samples, start, None)


def corpus_id(spec: str) -> str:
    """What identifies the corpus in cache keys: the spec for hub corpora, a content hash for files."""
    if spec.startswith("hf:"):
        return spec
    path = _default_path() if spec == DEFAULT else Path(spec).expanduser()
    if not path.is_file():
        raise HarnessError("corpus file not found", file=path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"
