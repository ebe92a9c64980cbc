"""Editor (a method) and Edited (a model with an edit applied, possibly different per batch row)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from meg_harness.data.edit_case import EditCase
from meg_harness.prompts import QueryTemplate


def reused_work(stage: str, read: int, total: int, seconds: float | None = None) -> dict[str, Any]:
    """One entry of a fit's ``info["reused"]``: ``read`` of the ``total`` units of ``stage`` (z chunks,
    neurons, training steps) were read back from the cache instead of computed by this process, and the
    seconds computing them took when they ran (None: not recorded). A run's own fit time plus these seconds
    is what its fit cost in all."""
    return {"stage": stage, "read": int(read), "total": int(total), "seconds": seconds}


class Edited:
    """A model as the evaluator sees it after an edit.

    Static weight edits change the model once; per-query methods (MeG) override :meth:`rows`, which
    the evaluator enters around every forward/generate call with the raw question of each batch row,
    in batch order. Inside it, row ``b`` of the model's input carries the modification for
    ``questions[b]`` (for every position, generated tokens included).
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info: dict[str, Any] = {}  # what fitting reported (success rates, timings); saved with results

    @contextlib.contextmanager
    def rows(self, questions: Sequence[str]) -> Iterator[None]:
        """Attach per-row modifications for one batch; the default (static or no edit) does nothing."""
        yield

    def routed(self, questions: Sequence[str]) -> list[bool] | None:
        """Which rows receive an edit (MeG's familiarity routing); ``None`` when not meaningful."""
        return None

    def restore(self) -> None:
        """Undo the edit on ``self.model`` (bit-exact for weight-editing methods)."""


class Editor(ABC):
    """A knowledge-editing method, built from hyper-parameters (an EasyEdit-style YAML's contents)."""

    name: ClassVar[str]

    def __init__(self, hparams: dict[str, Any] | None = None) -> None:
        """Subclasses validate ``hparams`` here: a bad value raises HarnessError before any work starts."""
        self.hparams = dict(hparams or {})
        self.cache_dir: Path | None = None  # None: meg-harness's cache ($MEG_HARNESS_CACHE)

    def resolved_hparams(self) -> dict[str, Any]:
        """The hparams with every default filled in: what a result was computed with. Two mappings that
        differ only by a key set to its default resolve equally. Default: the mapping as given."""
        settings = getattr(self, "hp", None)  # the baselines' validated settings dataclass
        if dataclasses.is_dataclass(settings):
            return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
        return dict(self.hparams)

    def preflight(self, model: Any) -> None:
        """Check what the hparams can only be checked against (the loaded model's depth, files they name)
        before anything is fitted or written; a HarnessError names the hparams field. Default: nothing."""
        return None

    @abstractmethod
    def fit(self, model: Any, tokenizer: Any, cases: Sequence[EditCase], template: QueryTemplate) -> Edited:
        """Edit ``model`` (or train what edits it) so that each case's prompt yields its ``target_new``."""

    def save(self, edited: Edited, directory: Path) -> None:
        """Write the artifact that :meth:`load` reads back; every artifact has ``editor.json`` (method and
        hparams). Methods with weights extend this."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"method": self.name, "hparams": self.hparams}
        (directory / "editor.json").write_text(
            json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
        )

    @classmethod
    def load(cls, directory: Path, model: Any, tokenizer: Any) -> Edited:
        """Apply a saved artifact to ``model``."""
        return Edited(model, tokenizer)


class NoEdit(Editor):
    """The unedited model (``none`` in a run config)."""

    name = "none"

    def fit(self, model, tokenizer, cases, template) -> Edited:
        return Edited(model, tokenizer)
