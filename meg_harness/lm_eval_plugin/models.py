"""The lm-eval models ``meg`` (MeG: a generated neuron per query) and ``edited`` (a saved weight edit).

    lm_eval --model meg    --model_args pretrained=PATH_OR_ALIAS,meg_path=ARTIFACT_DIR ...
    lm_eval --model edited --model_args pretrained=PATH_OR_ALIAS,delta=ARTIFACT_DIR ...
    lm_eval --model edited --model_args pretrained=PATH_OR_ALIAS ...        (the unedited model)

Each run loads a fresh model and applies the edit once; nothing is restored. Every other model arg is
HFLM's (``batch_size``, ``device``, ``max_length``, ...), plus ``template`` and ``cache_dir`` (see
:class:`PerRowHFLM`). ``delta`` here is a meg-harness artifact folder, not HFLM's own ``delta``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own table first: get_model imports it only when empty)
from lm_eval.api.registry import register_model

from meg_harness.editing.base import Edited, Editor
from meg_harness.errors import HarnessError
from meg_harness.lm_eval_plugin.artifacts import artifact_method, load_artifact
from meg_harness.lm_eval_plugin.perrow import PerRowHFLM

MEG_SOURCE = (
    "MeG artifacts come from `meg-harness run` with `methods: [meg]` (the folder <out>/meg/seed<k>/artifact)"
)


def load_edited(meg_path: str | Path, model: Any, tokenizer: Any) -> Edited:
    """Apply the MeG artifact in ``meg_path`` to ``model`` (extension point).

    Dispatches to the ``meg`` Editor's :meth:`Editor.load` through the editing registry: once MeG's
    Editor implements ``load`` (encoder + familiarity network + generator -> a per-row :class:`Edited`),
    this works unchanged.
    """
    from meg_harness.editing.registry import get_editor_class

    method = artifact_method(meg_path) if Path(meg_path).is_dir() else None
    if method is None:
        raise HarnessError(f"not a MeG artifact folder; {MEG_SOURCE}", file=meg_path, field="meg_path")
    if method != "meg":
        raise HarnessError(
            f"this is a {method!r} artifact, not MeG's: use `--model edited --model_args delta=...`",
            file=meg_path,
            field="meg_path",
        )
    try:
        editor = get_editor_class("meg")
    except HarnessError:
        editor = None
    if editor is None or editor.load.__func__ is Editor.load.__func__:
        raise HarnessError(
            f"this installation cannot load MeG artifacts yet (no `meg` editor with a loader); {MEG_SOURCE}",
            file=meg_path,
            field="meg_path",
        )
    return editor.load(Path(meg_path), model, tokenizer)


@register_model("meg")
class MegLM(PerRowHFLM):
    """MeG: each batch row gets the neuron generated for its own question (or none when routed away)."""

    def __init__(self, pretrained: str, meg_path: str | None = None, **kwargs: Any) -> None:
        if not meg_path:
            raise HarnessError(f"--model meg needs meg_path=ARTIFACT_DIR; {MEG_SOURCE}", field="meg_path")
        self.meg_path = str(meg_path)
        super().__init__(pretrained, **kwargs)

    def load_edited(self, model: Any, tokenizer: Any) -> Edited:
        return load_edited(self.meg_path, model, tokenizer)


@register_model("edited")
class EditedLM(PerRowHFLM):
    """A model with a saved edit applied (``delta=`` an artifact folder); the unedited model without it."""

    def __init__(self, pretrained: str, delta: str | None = None, **kwargs: Any) -> None:
        self.delta_path = str(delta) if delta else None
        super().__init__(pretrained, **kwargs)

    def load_edited(self, model: Any, tokenizer: Any) -> Edited:
        if self.delta_path is None:
            return Edited(model, tokenizer)
        return load_artifact(self.delta_path, model, tokenizer)
