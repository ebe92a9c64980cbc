"""An EasyEdit-style API over every registered method (MeG and the baselines).

Researchers know EasyEdit (zjunlp/EasyEdit): an hparams YAML with ``alg_name``, ``BaseEditor.from_hparams``,
``batch_edit(prompts, target_new, ...)`` returning per-request metrics, and ``apply_<method>_to_model(model,
tok, requests, hparams)`` functions collected in ``ALG_DICT``. This module offers the same shapes on top of
meg-harness's :class:`~meg_harness.editing.base.Editor` registry and its ONE evaluation protocol:

- :class:`HyperParams` -- a generic hparams object for any registered method (``alg_name`` picks it);
- :class:`BaseEditor` -- ``from_hparams(...)`` / ``batch_edit(...)``, scored by meg-harness's Evaluator
  (TF and AG);
- :func:`apply_to_model` / :func:`apply_meg_to_model` -- EasyEdit's apply signature; MeG's returned model
  carries PERSISTENT per-row routing (:class:`RowRouting`), so plain ``model(input_ids=...)`` and
  ``model.generate`` calls get each row's neuron;
- :func:`register_with_easyedit` -- adds ``"MEG"`` to ``easyeditor.util.alg_dict.ALG_DICT`` when installed.

The second value every apply function returns is a :class:`Restore`: call it to undo the edit; it is also a
dict of the original tensors of the changed weights (EasyEdit's ``weights_copy``), so EasyEdit's own restore
loop works too.
"""

from meg_harness.easyedit.apply import (
    Restore,
    apply_meg_to_model,
    apply_to_model,
    persist,
    register_with_easyedit,
    resolve_template,
)
from meg_harness.easyedit.editor import BaseEditor, summary_metrics
from meg_harness.easyedit.hparams import API_KEYS, HyperParams, as_hparams
from meg_harness.easyedit.requests import NO_GROUND_TRUTH, prepare_requests, request_to_case
from meg_harness.editing.routing import RowRouting, detach_routing, is_per_row, question_from_text

__all__ = [
    "API_KEYS",
    "NO_GROUND_TRUTH",
    "BaseEditor",
    "HyperParams",
    "Restore",
    "RowRouting",
    "apply_meg_to_model",
    "apply_to_model",
    "as_hparams",
    "detach_routing",
    "is_per_row",
    "persist",
    "prepare_requests",
    "question_from_text",
    "register_with_easyedit",
    "request_to_case",
    "resolve_template",
    "summary_metrics",
]
