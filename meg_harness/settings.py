"""Settings dataclasses (every method's hparams, the run config) checked field by field from their types and
:class:`Rule` s, built from mappings (a YAML section) with one-line errors naming the bad field, and hparams
YAML files that extend another (``base: PATH``)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from meg_harness.errors import HarnessError

T = TypeVar("T")
BASE_KEY = "base"  # an hparams mapping's key naming the hparams file it extends


@dataclasses.dataclass(frozen=True)
class Rule:
    """An allowed range of a settings field: ``test(value)`` is true for allowed values; ``text`` completes
    "must be ..." with ``{noun}`` / ``{a_noun}`` standing for the field's type ("integer" / "an integer")."""

    text: str
    test: Callable[[Any], bool]

    def describe(self, noun: str) -> str:
        article = "an" if noun[:1] in "aeiou" else "a"
        return self.text.format(noun=noun, a_noun=f"{article} {noun}")


POSITIVE = Rule("a positive {noun}", lambda v: v > 0)
NON_NEGATIVE = Rule("a non-negative {noun}", lambda v: v >= 0)


def at_least(low: float) -> Rule:
    return Rule(f"{{a_noun}} at least {low}", lambda v: v >= low)


def in_range(low: float, high: float, *, high_open: bool = False) -> Rule:
    close = ")" if high_open else "]"
    return Rule(
        f"{{a_noun}} in [{low}, {high}{close}", lambda v: low <= v < high if high_open else low <= v <= high
    )


def one_of(*choices: Any) -> Rule:
    return Rule(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


class Settings:
    """Base of every settings dataclass (hparams sections, the run config): on construction each field is
    checked against its annotated type (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[int,
    ...]``, ``list[int]``, ``dict``, a nested dataclass) and against its :class:`Rule` in ``CHECKS``; a
    HarnessError names the field. Numbers written ``1e-4`` (a string in YAML 1.1) become floats, lists become
    tuples. A new field needs nothing but its annotation and default; cross-field checks go in
    :meth:`check`."""

    CHECKS: ClassVar[Mapping[str, Rule]] = {}

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            normal = checked_value(value, hints[item.name], self.CHECKS.get(item.name), item.name)
            if normal is not value:
                object.__setattr__(self, item.name, normal)
        self.check()

    def check(self) -> None:
        """Checks that involve several fields (raise HarnessError naming one of them)."""


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Mismatch(Exception):
    """A value that is not of the expected type."""


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _noun(annotation: Any) -> str:
    """The word for a value of ``annotation`` in messages (of its items for a list, of X for ``X | None``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    items = [a for a in args if a is not type(None) and a is not Ellipsis]
    if origin in (Union, types.UnionType, tuple, list) and len(items) == 1:
        return _noun(items[0])
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(annotation, "value")


def _describe(annotation: Any) -> str:
    """``int | None`` -> "an integer or null"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (tuple, list):
        item = args[0] if args else Any
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
            return f"a list of two {_noun(item)}s"
        return f"a list of {_noun(item)}s"
    if origin is dict or annotation is dict:
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        annotation, str(annotation)
    )


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (a list as a tuple, ``"1e-4"`` as a float); _Mismatch if it is not."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return value
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is Ellipsis and isinstance(value, int):
            value = [value]  # ``layers: 5`` is ``layers: [5]``
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise _Mismatch
        items = [_coerce(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # an annotation this checker does not know: accepted as is


def checked_value(value: Any, annotation: Any, rule: Rule | None, name: str) -> Any:
    """``value`` coerced to ``annotation`` and within ``rule``; a HarnessError naming ``name`` otherwise."""
    expected = rule.describe(_noun(annotation)) if rule is not None else _describe(annotation)
    problem = HarnessError(f"must be {expected}, got {value!r}", field=name)
    try:
        coerced = _coerce(value, annotation)
    except _Mismatch:
        raise problem from None
    if rule is not None and coerced is not None:
        try:
            ok = bool(rule.test(coerced))
        except TypeError:
            ok = False
        if not ok:
            raise problem
    return coerced


def settings_from_mapping(
    cls: type[T],
    mapping: Mapping[str, Any] | T | None,
    what: str,
    prefix: str = "",
    ignored: Iterable[str] = (),
) -> T:
    """Dataclass ``cls`` from ``mapping`` (an instance passes through); an unknown key (not in ``ignored``)
    is a HarnessError whose field is ``prefix + key``, as is that of a validation error the dataclass
    raises. ``what`` names the settings in the message (``"memit hparam"``, ``"collection setting"``)."""
    if isinstance(mapping, cls):
        return mapping
    if mapping is not None and not isinstance(mapping, Mapping):
        field = prefix.rstrip(".") or None
        raise HarnessError(f"must be a mapping of {what}s, got {mapping!r}", field=field)
    skip = set(ignored)
    values = {k: v for k, v in dict(mapping or {}).items() if k not in skip}
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise HarnessError(
            f"unknown {what}(s) {unknown}; known: {sorted(known)}", field=f"{prefix}{unknown[0]}"
        )
    try:
        return cls(**values)
    except HarnessError as error:  # a validation error of the dataclass: name the field with its section
        field = f"{prefix}{error.field}" if error.field else None
        raise HarnessError(error.reason, file=error.file, field=field) from None


def check_alg_name(mapping: Mapping[str, Any], method: str) -> None:
    """An ``alg_name`` in an hparams mapping must name ``method`` (case-insensitive: ``MEMIT`` for memit)."""
    alg = mapping.get("alg_name")
    if alg is not None and (not isinstance(alg, str) or alg.strip().lower() != method.lower()):
        raise HarnessError(
            f"alg_name is {alg!r} but these hparams are used for {method}: fix alg_name or the method",
            field="alg_name",
        )


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


def with_base(mapping: Mapping[str, Any], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """``mapping`` on top of the hparams file its ``base:`` names (chains resolved); as is without one.

    This is how a run config states a variant: ``pmet@c3: {base: hparams/PMET/x.yaml, clamp_norm_factor: 3}``.
    """
    values = dict(mapping)
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    if not isinstance(base, (str, os.PathLike)):
        raise HarnessError(f"base must be the path of an hparams YAML, got {base!r}", field="base")
    return deep_merge(read_hparams_file(base, _chain), values)


def read_hparams_file(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An hparams YAML file's mapping, ``base:`` chains resolved (relative paths: the working directory)."""
    import yaml

    resolved = Path(path).resolve()
    if resolved in _chain:
        raise HarnessError("its base chain leads back to itself", file=path, field="base")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise HarnessError(f"cannot read hparams: {error.strerror}", file=path) from None
    except UnicodeDecodeError:
        raise HarnessError("cannot read hparams: not a UTF-8 text file", file=path) from None
    except yaml.YAMLError:
        raise HarnessError("not valid YAML", file=path) from None
    if not isinstance(data, dict):
        raise HarnessError("an hparams file must be a YAML mapping", file=path)
    try:
        return with_base(data, (*_chain, resolved))
    except HarnessError as error:
        raise HarnessError(error.reason, file=error.file or path, field=error.field) from None


def _sets(mapping: Mapping[str, Any], key: str) -> bool:
    """Whether ``mapping`` sets the dotted ``key`` (or a section above it)."""
    head, _, rest = key.partition(".")
    if head not in mapping:
        return False
    value = mapping[head]
    return not rest or not isinstance(value, Mapping) or _sets(value, rest)


def key_origin(value: Mapping[str, Any] | str | os.PathLike, key: str) -> str | None:
    """The hparams file whose contents set the dotted ``key`` of ``value`` (an inline mapping or a file's
    path; ``base:`` chains followed); ``None`` when the inline mapping sets it. A key no file sets (a
    default) is ``value``'s own: its path, or ``None`` for a mapping."""
    import yaml

    top = None if isinstance(value, Mapping) else str(value)
    current: Any = value
    for _ in range(32):  # a base chain this deep is a loop
        path = None
        if not isinstance(current, Mapping):
            path = str(current)
            try:
                current = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                return path
            if not isinstance(current, Mapping):
                return path
        if _sets(current, key):
            return path
        base = current.get(BASE_KEY)
        if not isinstance(base, (str, os.PathLike)):
            break
        current = base
    return top
