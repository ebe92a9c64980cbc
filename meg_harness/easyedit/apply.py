"""EasyEdit's apply functions for every registered method (``apply_to_model``, ``apply_meg_to_model``), the
:class:`Restore` they return, and registration with EasyEdit's ``ALG_DICT``."""

from __future__ import annotations

import copy as copy_module
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meg_harness.data.edit_case import EditCase
from meg_harness.easyedit.hparams import HyperParams, as_hparams
from meg_harness.easyedit.requests import request_to_case
from meg_harness.editing.base import Edited
from meg_harness.editing.registry import get_editor_class
from meg_harness.editing.routing import RowRouting, detach_routing, is_per_row
from meg_harness.errors import HarnessError
from meg_harness.models.adapters import get_adapter
from meg_harness.prompts import QueryTemplate, get_template

log = logging.getLogger(__name__)


# -- the template --------------------------------------------------------------------------------------------
def resolve_template(template: str | QueryTemplate | None, model: nn.Module, tok: Any) -> QueryTemplate:
    """``template`` (a name, a text with ``{}``, or a QueryTemplate), else the model family's default."""
    if isinstance(template, QueryTemplate):
        return template
    if template is None:
        template = get_adapter(model).default_template(model, tok)
    return get_template(template)


# -- restoring ----------------------------------------------------------------------------------------------
class Restore(dict):
    """Undoes an edit when called (idempotent). As a dict it holds the original tensors of the changed weights
    (EasyEdit's ``weights_copy``: parameter name -> CPU tensor; empty for per-row methods like MeG).
    ``edited`` is the :class:`~meg_harness.editing.base.Edited` (e.g. ``MegEdited``) behind the edit."""

    def __init__(
        self,
        undo: Callable[[], None],
        originals: Mapping[str, torch.Tensor],
        edited: Edited,
        routing: RowRouting | None = None,
    ) -> None:
        super().__init__(originals)
        self._undo: Callable[[], None] | None = undo
        self.edited = edited
        self.routing = routing  # per-row methods: the hooks (``routing.install()`` re-attaches them)

    def __call__(self) -> None:
        if self.routing is not None:  # removing hooks is idempotent: also undoes a re-install
            self.routing.remove()
            self._undo = None
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()

    @property
    def done(self) -> bool:
        return self._undo is None


def original_tensors(edited: Edited) -> dict[str, torch.Tensor]:
    delta = getattr(edited, "delta", None)
    return dict(getattr(delta, "_originals", None) or {})


def persist(edited: Edited, template: QueryTemplate, known: Sequence[str] = ()) -> Restore:
    """Make ``edited`` act on plain model calls: per-row methods get a :class:`RowRouting` (restore removes
    it); static weight edits are already in the weights (restore puts the originals back)."""
    if is_per_row(edited):
        routing = RowRouting(edited, template, known).install()
        return Restore(routing.remove, {}, edited, routing)
    return Restore(edited.restore, original_tensors(edited), edited)


# -- apply functions (EasyEdit's signature) ------------------------------------------------------------------
def known_questions(cases: Sequence[EditCase]) -> list[str]:
    return [q for c in cases for q in (c.prompt, *c.rephrases, *(p.prompt for p in c.locality))]


def fit_editor(
    method: str,
    hp: HyperParams | None,
    model: nn.Module,
    tok: Any,
    cases: Sequence[EditCase],
    template: QueryTemplate,
    cache_dir: str | os.PathLike | None,
    verbose: bool,
) -> Edited:
    cls = get_editor_class(method)
    editor = cls(hp.editor_hparams() if hp is not None else {})
    editor.cache_dir = None if cache_dir is None else Path(cache_dir)
    if hasattr(editor, "progress"):
        editor.progress = verbose
    with torch.enable_grad():  # methods optimise; callers may be inside torch.no_grad()
        return editor.fit(model, tok, list(cases), template)


def apply_to_model(
    method: str,
    model: nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]],
    hparams: Any = None,
    *,
    template: str | QueryTemplate | None = None,
    copy: bool = False,
    artifact: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, Restore]:
    """EasyEdit's ``apply_<method>_to_model`` for any registered ``method``: edit ``model`` for ``requests``.

    ``requests``: EasyEdit request dicts (``prompt``, ``target_new`` (str or ``{"str": ...}``),
    ``ground_truth``, ``subject``, optional ``rephrase_prompt``, ``locality``). ``hparams``: a HyperParams,
    MEGHyperParams, mapping or YAML path (None: the method's defaults). ``template``: the query template the
    method fits with (default: the model family's; pass ``"plain"`` when raw prompts will be scored, as
    EasyEdit's own evaluation does). ``copy``: edit a deep copy. ``artifact``: load a saved artifact instead
    of fitting. EasyEdit's other keywords (``return_orig_weights``, ``keep_original_weight``, ``train_ds``,
    ...) are accepted and ignored: the returned :class:`Restore` always carries the originals.

    Static weight edits change the weights in place; per-row methods (MeG) get a :class:`RowRouting` on the
    model. A routing left by a previous call on the same model is removed first.
    """
    hp = None if hparams is None else as_hparams(hparams)
    if hp is not None and hp.method != method:
        raise HarnessError(
            f"hparams are for {hp.alg_name!r}, not {method!r}", file=hp.source, field="alg_name"
        )
    if kwargs:
        log.debug("ignored EasyEdit keyword(s): %s", sorted(kwargs))
    if copy:
        model = copy_module.deepcopy(model)
    detach_routing(model)
    cases = [request_to_case(i, r) for i, r in enumerate(requests)]
    if not cases:
        raise HarnessError("no requests given", field="requests")
    if artifact is not None:
        edited = get_editor_class(method).load(Path(artifact), model, tok)
        chosen = template if template is not None else getattr(edited, "template", None)
        resolved = resolve_template(chosen, model, tok)
    else:
        resolved = resolve_template(template, model, tok)
        edited = fit_editor(method, hp, model, tok, cases, resolved, cache_dir, verbose)
    return model, persist(edited, resolved, known_questions(cases))


def apply_meg_to_model(
    model: nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]],
    hparams: Any,
    **kwargs: Any,
) -> tuple[nn.Module, Restore]:
    """EasyEdit's apply signature for MeG: fit MeG on ``requests`` (or load ``artifact=``) and install the
    persistent per-row routing, so that ``model(input_ids=...)`` and ``model.generate`` give each row the
    neuron generated for its question (see :class:`RowRouting` and :func:`question_from_text`).
    ``restore()`` removes the routing. Keywords: those of :func:`apply_to_model`."""
    return apply_to_model("meg", model, tok, requests, hparams, **kwargs)


# -- EasyEdit registration -----------------------------------------------------------------------------------
def register_with_easyedit() -> bool:
    """Add ``"MEG": apply_meg_to_model`` to ``easyeditor.util.alg_dict.ALG_DICT`` (and ``MEGHyperParams`` to
    an hparams-class map there, and to ``easyeditor``'s namespace, where such names exist). EasyEdit's own
    methods are left alone. False (no error) when ``easyeditor`` is not importable."""
    import importlib

    try:
        alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    except ImportError:
        return False
    from meg_harness.meg.hparams import MEGHyperParams

    table = getattr(alg_dict, "ALG_DICT", None)
    if not isinstance(table, dict):
        table = {}
        alg_dict.ALG_DICT = table
    table["MEG"] = apply_meg_to_model
    for name in ("HPARAMS_DICT", "HYPERPARAMS_DICT", "HPARAMS_CLASS_DICT", "ALG_HPARAMS_DICT"):
        mapping = getattr(alg_dict, name, None)
        if isinstance(mapping, dict):
            mapping["MEG"] = MEGHyperParams
    package = importlib.import_module("easyeditor")
    if not hasattr(package, "MEGHyperParams"):
        package.MEGHyperParams = MEGHyperParams
    return True
