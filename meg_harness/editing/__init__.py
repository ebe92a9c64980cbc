"""The Editor interface every method implements, the method registry, and the EasyEdit-style API
(:mod:`meg_harness.editing.easyedit`, imported on first use of its names)."""

from typing import Any

from meg_harness.editing.base import Edited, Editor
from meg_harness.editing.registry import get_editor_class, list_methods, register_method

# EasyEdit-style names, resolved lazily (the module imports the evaluator, torch and transformers).
_EASYEDIT = (
    "BaseEditor",
    "HyperParams",
    "apply_meg_to_model",
    "apply_to_model",
    "register_with_easyedit",
    "summary_metrics",
)

__all__ = ["Edited", "Editor", "get_editor_class", "list_methods", "register_method", *_EASYEDIT]


def __getattr__(name: str) -> Any:
    if name in _EASYEDIT:
        from meg_harness.editing import easyedit

        return getattr(easyedit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
