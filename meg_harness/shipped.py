"""The folders meg-harness ships beside its code: ``hparams/`` (an EasyEdit-style YAML per method and model
alias) and ``tasks/`` (the lm-eval task YAMLs).

Both live at the top of the repository, the one source of these files. A source checkout (an editable
install included) reads them there; a regular install (``pip install .``, a wheel) carries a copy in
``meg_harness/_resources/``, written by the build step (:mod:`meg_harness._build`). :func:`shipped_dir` is
the one place that decides which of the two is used.
"""

from __future__ import annotations

from pathlib import Path

from meg_harness.errors import HarnessError

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_ROOT = PACKAGE_DIR.parent  # the repository, when the package is imported from a source checkout
INSTALLED_DIR = PACKAGE_DIR / "_resources"  # the copies a regular install carries (see meg_harness._build)
SHIPPED = ("hparams", "tasks")


def shipped_dir(name: str) -> Path:
    """The folder ``name`` (``"hparams"`` or ``"tasks"``): the repository's own in a source checkout (a
    ``pyproject.toml`` beside the package), else the installed copy; a HarnessError when neither exists."""
    if name not in SHIPPED:
        raise ValueError(f"meg-harness ships {', '.join(SHIPPED)}, not {name!r}")
    for folder in _candidates(name):
        if folder.is_dir():
            return folder
    raise HarnessError(
        f"meg-harness's {name}/ folder is missing (neither {CHECKOUT_ROOT / name} nor {INSTALLED_DIR / name} "
        "exists): reinstall the package (pip install .) or run from a source checkout"
    )


def _in_checkout() -> bool:
    return (CHECKOUT_ROOT / "pyproject.toml").is_file()


def _candidates(name: str) -> list[Path]:
    """Where ``name`` may be, in order: the checkout's folder (only in a checkout), the installed copy."""
    return [CHECKOUT_ROOT / name] * _in_checkout() + [INSTALLED_DIR / name]


def hparams_root() -> Path:
    """The shipped hparams: ``<root>/<METHOD>/<model alias>.yaml`` (and ``MEG/collect-<alias>.yaml``)."""
    return shipped_dir("hparams")


def shipped_hparams(method: str, model_alias: str) -> Path | None:
    """The shipped ``hparams/<METHOD>/<alias>.yaml`` of ``method`` (folder name in any case), or None."""
    name = f"{model_alias.lower()}.yaml"
    for folder in (d for d in hparams_root().iterdir() if d.name.lower() == method.lower()):
        if (folder / name).is_file():
            return folder / name
    return None


def tasks_root() -> Path:
    """The lm-eval task YAMLs: what ``meg-harness tasks-path`` prints for ``lm_eval --include_path``."""
    return shipped_dir("tasks")


def display_path(path: Path) -> str:
    """``path`` as recorded in results: relative to the repository in a checkout, a shipped file of an install
    as ``hparams/...`` or ``tasks/...`` (the same text either way); any other path as given."""
    resolved = Path(path).resolve()
    for root in [CHECKOUT_ROOT] * _in_checkout() + [INSTALLED_DIR]:
        if resolved.is_relative_to(root):
            return str(resolved.relative_to(root))
    return str(path)
