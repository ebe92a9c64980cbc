"""Interpreter start-up hook, run by ``meg_harness_lm_eval.pth`` in site-packages (standard library only).

:func:`install` puts a one-shot finder on ``sys.meta_path``. Nothing else happens until some code imports
``lm_eval.api.registry`` (the ``lm_eval`` CLI does, before it looks a model up); right after that module
has executed, :func:`meg_harness.lm_eval_plugin.register` adds ``meg`` and ``edited`` to it. Processes
that never use lm-eval pay for one finder call per import and import nothing more.
"""

from __future__ import annotations

import sys
import warnings
from importlib.abc import MetaPathFinder

TARGET = "lm_eval.api.registry"


def _register() -> None:
    try:
        from meg_harness.lm_eval_plugin import register

        register()
    except Exception as exc:  # never break lm_eval itself
        warnings.warn(f"meg-harness could not register its lm-eval models: {exc}", stacklevel=2)


class RegistryWatcher(MetaPathFinder):
    """Finds ``lm_eval.api.registry`` through the other finders and runs the registration after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        original = getattr(loader, "exec_module", None)
        if original is None:
            return spec

        def exec_module(module) -> None:
            original(module)
            _register()

        loader.exec_module = exec_module  # the loader instance belongs to this one module
        return spec


def install() -> None:
    """Arrange the registration (idempotent); registers at once if lm_eval's registry is already loaded."""
    if TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, RegistryWatcher())
