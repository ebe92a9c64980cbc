"""The Editor interface every method implements, and the method registry."""

from meg_harness.editing.base import Edited, Editor
from meg_harness.editing.registry import get_editor_class, list_methods, register_method

__all__ = ["Edited", "Editor", "get_editor_class", "list_methods", "register_method"]
