"""The Editor interface every method implements, the method registry, and per-row routing of plain model
calls (:mod:`meg_harness.editing.routing`). The EasyEdit-style API is :mod:`meg_harness.easyedit`."""

from meg_harness.editing.base import Edited, Editor, reused_work
from meg_harness.editing.registry import get_editor_class, list_methods, register_method

__all__ = ["Edited", "Editor", "get_editor_class", "list_methods", "register_method", "reused_work"]
