"""Settings dataclasses from mappings (a YAML section), with one-line errors naming the bad field."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from meg_harness.errors import HarnessError

T = TypeVar("T")


def settings_from_mapping(
    cls: type[T], mapping: Mapping[str, Any] | T | None, what: str, prefix: str = ""
) -> T:
    """Dataclass ``cls`` from ``mapping`` (an instance passes through); an unknown key is a HarnessError
    whose field is ``prefix + key``."""
    if isinstance(mapping, cls):
        return mapping
    values = dict(mapping or {})  # type: ignore[arg-type]
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise HarnessError(
            f"unknown {what} setting(s) {unknown}; known: {sorted(known)}", field=f"{prefix}{unknown[0]}"
        )
    return cls(**values)


def require_positive_ints(settings: Any, names: Iterable[str]) -> None:
    """Each named attribute must be an int >= 1 (not a bool)."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HarnessError(f"must be a positive integer, got {value!r}", field=name)


def require_non_negative(settings: Any, names: Iterable[str]) -> None:
    """Each named attribute must be a number >= 0 (not a bool)."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise HarnessError(f"must be a non-negative number, got {value!r}", field=name)
