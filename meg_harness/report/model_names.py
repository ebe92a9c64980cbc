"""One name per model in the reports: our alias where a result names the alias, its hub id or a folder."""

from __future__ import annotations

from pathlib import PurePosixPath


def _aliases() -> dict[str, str]:
    """Lower-cased alias and hub id -> alias (hub aliases only; packaged models are known by alias)."""
    from meg_harness.models.loading import ALIASES

    names = {alias.lower(): alias for alias in ALIASES}
    names.update({target.lower(): alias for alias, target in ALIASES.items() if isinstance(target, str)})
    return names


def canonical_model(name: str) -> str:
    """``microsoft/phi-2``, ``/models/phi-2`` and ``Phi-2`` -> ``phi-2``; other paths -> their last part.

    Never an absolute path, so that reports do not depend on where results were produced."""
    text = str(name).strip().rstrip("/")
    aliases = _aliases()
    if text.lower() in aliases:
        return aliases[text.lower()]
    last = PurePosixPath(text.replace("\\", "/")).name or text
    return aliases.get(last.lower(), last)
