"""Reading record files and validating fields; every problem raises HarnessError naming file/record/field."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meg_harness.errors import HarnessError


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON list file or a JSON Lines file (``.jsonl``, or a ``.json`` holding JSON Lines)."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError("is a directory, expected a JSON or JSON Lines file", file=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise HarnessError("no such file", file=path) from None
    except UnicodeDecodeError as exc:
        raise HarnessError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", file=path) from None
    except OSError as exc:
        raise HarnessError(f"cannot read the file ({exc.strerror or exc})", file=path) from None
    if path.suffix.lower() == ".jsonl":
        data: Any = _parse_jsonl(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            data = _try_jsonl(text, path)
            if data is None:
                raise HarnessError(
                    f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", file=path
                ) from None
    if not isinstance(data, list):
        raise HarnessError(f"expected a JSON list of records, got a JSON {_type_name(data)}", file=path)
    if not data:
        raise HarnessError("contains no records", file=path)
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise HarnessError(
                f"expected a JSON object, got a JSON {_type_name(record)}", file=path, record=index
            )
    return data


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise HarnessError(
                f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
                file=path,
                record=len(records),
            ) from None
    return records


def _try_jsonl(text: str, path: Path) -> list[Any] | None:
    """JSON Lines content in a file not named ``.jsonl``; None when it is not that either."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        return None


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Record:
    """One record of a file, with typed accessors that raise HarnessError naming file, index and field."""

    data: dict[str, Any]
    file: Path
    index: int

    def error(self, message: str, field: str | None = None) -> HarnessError:
        return HarnessError(message, file=self.file, record=self.index, field=field)

    @property
    def source(self) -> str:
        return f"{self.file}:{self.index}"

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def value(self, key: str, obj: dict[str, Any] | None = None, prefix: str = "") -> Any:
        """The value of a required key (of ``obj``, a nested object at field path ``prefix``)."""
        obj = self.data if obj is None else obj
        if key not in obj or obj[key] is None:
            raise self.error("missing required field", f"{prefix}{key}")
        return obj[key]

    def obj(self, key: str, obj: dict[str, Any] | None = None, prefix: str = "") -> dict[str, Any]:
        value = self.value(key, obj, prefix)
        if not isinstance(value, dict):
            raise self.error(f"expected a JSON object, got a JSON {_type_name(value)}", f"{prefix}{key}")
        return value

    def text(
        self, key: str, obj: dict[str, Any] | None = None, prefix: str = "", target: bool = False
    ) -> str:
        """A required string field, stripped; must not be empty (``target`` says so in the message)."""
        return check_text(self, self.value(key, obj, prefix), f"{prefix}{key}", target=target)

    def texts(
        self,
        key: str,
        obj: dict[str, Any] | None = None,
        prefix: str = "",
        *,
        allow_str: bool = False,
        allow_empty: bool = False,
    ) -> list[str]:
        """A required list of non-empty strings (or one string when ``allow_str``), each stripped."""
        field = f"{prefix}{key}"
        value = self.value(key, obj, prefix)
        if allow_str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            kind = "a string or a list of strings" if allow_str else "a list of strings"
            raise self.error(f"expected {kind}, got a JSON {_type_name(value)}", field)
        if not value and not allow_empty:
            raise self.error("expected a non-empty list", field)
        return [check_text(self, item, f"{field}[{i}]") for i, item in enumerate(value)]

    def optional_texts(self, key: str, obj: dict[str, Any] | None = None, prefix: str = "") -> list[str]:
        """An optional list of strings (missing or null -> empty); empty strings are dropped."""
        obj = self.data if obj is None else obj
        value = obj.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error("expected a list of strings", f"{prefix}{key}")
        return [v.strip() for v in value if v.strip()]

    def case_id(self, key: str) -> str:
        """The record's id as a string; the index in the file when the record has none."""
        value = self.data.get(key)
        if value is None:
            return str(self.index)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self.error(f"expected a string or an integer, got a JSON {_type_name(value)}", key)
        if isinstance(value, str) and not value.strip():
            raise self.error("is empty", key)
        return str(value).strip()


def check_text(rec: Record, value: Any, field: str, target: bool = False) -> str:
    if not isinstance(value, str):
        raise rec.error(f"expected a string, got a JSON {_type_name(value)}", field)
    stripped = value.strip()
    if not stripped:
        raise rec.error("target is empty or whitespace" if target else "is empty or whitespace", field)
    return stripped


def records(path: Path) -> list[Record]:
    """Read ``path`` and wrap each record for validation."""
    return [Record(data, Path(path), i) for i, data in enumerate(read_records(path))]


def check_unique_ids(cases: list[Any], path: Path, field: str = "case_id") -> None:
    """Raise when two cases share a case_id."""
    seen: dict[str, int] = {}
    for index, case in enumerate(cases):
        if case.case_id in seen:
            raise HarnessError(
                f"duplicate id {case.case_id!r} (first used by record {seen[case.case_id]})",
                file=path,
                record=index,
                field=field,
            )
        seen[case.case_id] = index


def find_subject(text: str, subject: str) -> tuple[int, int] | None:
    """Span of the first occurrence of ``subject`` in ``text``: exact match first, then case-insensitive."""
    start = text.find(subject)
    if start >= 0:
        return start, start + len(subject)
    match = re.search(re.escape(subject), text, flags=re.IGNORECASE)
    return None if match is None else match.span()


def make_template(text: str, span: tuple[int, int]) -> str:
    """``text`` with the span replaced by ``{}`` (other braces escaped so ``.format(subject)`` works)."""

    def esc(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    return esc(text[: span[0]]) + "{}" + esc(text[span[1] :])


def subject_template(
    rec: Record, prompt: str, subject: str, field: str = "prompt", required: bool = True
) -> str | None:
    """The ROME-style template of ``prompt``; if the subject is absent: HarnessError, or None when
    not ``required``."""
    span = find_subject(prompt, subject)
    if span is None:
        if not required:
            return None
        raise rec.error(f"subject {subject!r} does not occur in the prompt {prompt!r}", field)
    return make_template(prompt, span)
