"""The method registry (EasyEdit's ALG_DICT analogue): name -> Editor class, populated by decoration.

Built-in methods register when :mod:`meg_harness.editing.methods` is imported; third-party code
registers with ``@register_method``.
"""

from __future__ import annotations

import importlib

from meg_harness.editing.base import Editor, NoEdit
from meg_harness.errors import HarnessError

_METHODS: dict[str, type[Editor]] = {"none": NoEdit}

# Methods that live in modules of their own, imported on first use (keeps `import meg_harness` light).
_LAZY: dict[str, str] = {
    "ft": "meg_harness.baselines.ft",
    "memit": "meg_harness.baselines.memit",
    "pmet": "meg_harness.baselines.pmet",
    "alphaedit": "meg_harness.baselines.alphaedit",
    "meg": "meg_harness.meg.editor",
    "malmen": "meg_harness.baselines.malmen",
}


def register_method(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _METHODS[cls.name] = cls
    return cls


def register_lazy(name: str, module: str) -> None:
    """Declare that importing ``module`` registers method ``name``."""
    _LAZY[name] = module


def list_methods() -> list[str]:
    return sorted(set(_METHODS) | set(_LAZY))


def get_editor_class(name: str) -> type[Editor]:
    """The Editor class registered under ``name``; a HarnessError naming the known ones otherwise."""
    if name not in _METHODS and name in _LAZY:
        importlib.import_module(_LAZY[name])
    if name not in _METHODS:
        raise HarnessError(
            f"unknown method {name!r}; known methods: {', '.join(list_methods())}", field="methods"
        )
    return _METHODS[name]
