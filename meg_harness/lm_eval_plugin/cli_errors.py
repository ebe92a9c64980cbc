"""One-line errors for the ``lm_eval`` command (standard library only: imported by the start-up hook).

lm-eval lets every exception raised by a model or task reach the top of its CLI, which prints a traceback of
~45 lines. In an ``lm_eval`` process (the console script, ``python -m lm_eval`` or a launcher's child),
:func:`install` adds a ``sys.excepthook`` that prints a :class:`~meg_harness.errors.HarnessError` (also one
found as the cause or context of another exception) as ``lm_eval: error: <message>`` on stderr and exits
with code 2, as ``meg-harness`` does. Every other exception keeps Python's usual traceback.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

from meg_harness.errors import HarnessError

EXIT_CODE = 2
_installed = False


def running_lm_eval_cli() -> bool:
    """Whether this process is the ``lm_eval`` command (``lm_eval``/``lm-eval``, ``python -m lm_eval``)."""
    argv0 = (sys.argv[0] if sys.argv else "").replace("\\", "/")
    return argv0.rsplit("/", 1)[-1] in ("lm_eval", "lm-eval") or argv0.endswith("lm_eval/__main__.py")


def harness_error_of(error: BaseException | None) -> HarnessError | None:
    """``error`` when it is a HarnessError, else the first HarnessError among its causes and contexts."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, HarnessError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    found = harness_error_of(error)
    if found is None:
        _previous(kind, error, trace)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    sys.stderr.write(f"lm_eval: error: {found}\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)  # an excepthook cannot choose the exit status otherwise (Python would exit with 1)


_previous = sys.excepthook


def install(force: bool = False) -> bool:
    """Install the hook in an ``lm_eval`` process (or anywhere with ``force``); True when it is active."""
    global _installed, _previous
    if _installed:
        return True
    if not (force or running_lm_eval_cli()):
        return False
    _previous = sys.excepthook
    sys.excepthook = _hook
    _installed = True
    return True
