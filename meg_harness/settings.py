"""Settings dataclasses from mappings (a YAML section), with one-line errors naming the bad field, and
hparams YAML files that extend another (``base: PATH``)."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meg_harness.errors import HarnessError

T = TypeVar("T")
BASE_KEY = "base"  # an hparams mapping's key naming the hparams file it extends


def settings_from_mapping(
    cls: type[T], mapping: Mapping[str, Any] | T | None, what: str, prefix: str = ""
) -> T:
    """Dataclass ``cls`` from ``mapping`` (an instance passes through); an unknown key is a HarnessError
    whose field is ``prefix + key``, as is that of a validation error the dataclass raises."""
    if isinstance(mapping, cls):
        return mapping
    values = dict(mapping or {})  # type: ignore[arg-type]
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise HarnessError(
            f"unknown {what} setting(s) {unknown}; known: {sorted(known)}", field=f"{prefix}{unknown[0]}"
        )
    try:
        return cls(**values)
    except HarnessError as error:  # a validation error of the dataclass: name the field with its section
        field = f"{prefix}{error.field}" if error.field else None
        raise HarnessError(error.reason, file=error.file, field=field) from None


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


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` applied; nested mappings merge key by key."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def with_base(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` on top of the hparams file its ``base:`` names (chains resolved); as is without one.

    This is how a run config states a variant: ``pmet@c3: {base: hparams/PMET/x.yaml, clamp_norm_factor: 3}``.
    """
    values = dict(mapping)
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    if not isinstance(base, (str, os.PathLike)):
        raise HarnessError(f"base must be the path of an hparams YAML, got {base!r}", field="base")
    return deep_merge(read_hparams_file(base), values)


def read_hparams_file(path: str | os.PathLike) -> dict[str, Any]:
    """An hparams YAML file's mapping, ``base:`` chains resolved (relative paths: the working directory)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise HarnessError(f"cannot read hparams: {error.strerror}", file=path) from None
    except yaml.YAMLError:
        raise HarnessError("not valid YAML", file=path) from None
    if not isinstance(data, dict):
        raise HarnessError("an hparams file must be a YAML mapping", file=path)
    try:
        return with_base(data)
    except HarnessError as error:
        raise HarnessError(error.reason, file=error.file or path, field=error.field) from None
