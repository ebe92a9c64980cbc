"""Loading a saved edit (the ``artifact/`` folder that ``meg-harness run`` writes) onto a loaded model.

Every artifact has ``editor.json`` (``{"method", "hparams"}``); the method's Editor class, from the
editing registry, applies it (:meth:`Editor.load`). A folder with only ``delta.safetensors`` (a weight
delta of :mod:`meg_harness.baselines.delta`) is applied directly. The ``check_*`` functions find a bad
artifact (missing, truncated, of the wrong kind) before a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError

EDITOR_FILE = "editor.json"
DELTA_FILE = "delta.safetensors"


def artifact_method(directory: str | Path) -> str | None:
    """The method named in ``directory/editor.json`` (``None`` when the file is absent)."""
    path = Path(directory) / EDITOR_FILE
    if not path.is_file():
        return None
    try:
        method = json.loads(path.read_text(encoding="utf-8")).get("method")
    except (OSError, ValueError, AttributeError) as error:
        raise HarnessError(f"unreadable editor record: {error}", file=path) from None
    if not isinstance(method, str) or not method:
        raise HarnessError("no 'method' in the editor record", file=path, field="method")
    return method


def check_tensor_files(directory: str | Path) -> None:
    """Every ``*.safetensors`` under ``directory`` has a readable header that fits its size (a truncated or
    foreign file is an error before any model is loaded)."""
    from safetensors import safe_open

    for path in sorted(Path(directory).rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
            reason = " ".join(str(error).split()) or type(error).__name__
            raise HarnessError(
                f"unreadable tensor file (truncated or not safetensors): {reason}", file=path
            ) from None


def check_edit_artifact(directory: str | Path) -> str | None:
    """Check the weight-edit artifact in ``directory`` without loading any model: its method (``None`` for
    a bare ``delta.safetensors`` folder). A MeG artifact is refused: it needs ``--model meg``."""
    from meg_harness.editing.registry import get_editor_class

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise HarnessError("the edit artifact folder does not exist", file=directory, field="delta")
    method = artifact_method(directory)
    if method == "meg":
        raise HarnessError(
            "this is a MeG artifact, not a weight edit: use `--model meg --model_args meg_path=...`",
            file=directory,
            field="delta",
        )
    if method is None and not (directory / DELTA_FILE).is_file():
        raise HarnessError(
            f"not an edit artifact (no {EDITOR_FILE} or {DELTA_FILE}); artifacts are the "
            "<out>/<method>/seed<k>/artifact folders written by `meg-harness run`",
            file=directory,
            field="delta",
        )
    if method is not None:
        get_editor_class(method)  # an unknown method: a HarnessError naming the known ones
    check_tensor_files(directory)
    return method


def load_artifact(directory: str | Path, model: Any, tokenizer: Any) -> Edited:
    """Apply the edit saved in ``directory`` to ``model`` (in place for weight edits)."""
    from meg_harness.editing.registry import get_editor_class

    directory = Path(directory).expanduser()
    method = check_edit_artifact(directory)
    if method is None:
        from meg_harness.baselines.delta import load_delta_artifact

        return load_delta_artifact(directory, model, tokenizer)
    return get_editor_class(method).load(directory, model, tokenizer)
