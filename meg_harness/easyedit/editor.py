"""EasyEdit's ``BaseEditor`` for every registered method, scored by meg-harness's one protocol, and
:func:`summary_metrics`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meg_harness.data.edit_case import EditCase
from meg_harness.easyedit.apply import (
    Restore,
    fit_editor,
    known_questions,
    original_tensors,
    persist,
    resolve_template,
)
from meg_harness.easyedit.hparams import as_hparams
from meg_harness.easyedit.requests import prepare_requests, request_to_case
from meg_harness.editing.base import Edited
from meg_harness.editing.routing import detach_routing, is_per_row
from meg_harness.errors import HarnessError
from meg_harness.evaluate.evaluator import Evaluator
from meg_harness.models import load_model
from meg_harness.models.loading import model_fingerprint
from meg_harness.prompts import QueryTemplate

log = logging.getLogger(__name__)


def _device(value: Any) -> str:
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    return str(value)


def _stage(case: EditCase, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One request's EasyEdit-shaped metrics from the Evaluator's items of that case."""

    def fields(prefix: str, chosen: Sequence[Mapping[str, Any]]) -> dict[str, list]:
        return {
            f"{prefix}_acc": [float(i["tf"]) for i in chosen],
            f"{prefix}_ag": [float(i["ag"]) for i in chosen],
            f"{prefix}_output": [i["prediction"] for i in chosen],
        }

    out: dict[str, Any] = fields("rewrite", [i for i in items if i["kind"] == "edit"])
    rephrase = [i for i in items if i["kind"] == "rephrase"]
    if rephrase:
        out.update(fields("rephrase", rephrase))
    locality = [i for i in items if i["kind"] == "locality"]
    keys = case.extra.get("locality_keys") or ["neighborhood"] * len(locality)
    out["locality"] = {}
    for key in dict.fromkeys(keys):
        out["locality"].update(fields(key, [i for i, k in zip(locality, keys) if k == key]))
    return out


def _by_case(items: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for item in items:
        grouped.setdefault(item["case_id"], []).append(item)
    return grouped


class BaseEditor:
    """EasyEdit's ``BaseEditor`` for every registered method, scored by meg-harness's one protocol.

    ``BaseEditor.from_hparams(hparams)`` (a HyperParams, MEGHyperParams or YAML path). The model is loaded on
    first use from ``hparams.model_name`` (a path, hub id or alias; ``device``/``dtype``/``fp16`` from the
    hparams) unless ``model``/``tok`` are given here or to :meth:`batch_edit`.
    """

    def __init__(
        self,
        hparams: Any,
        *,
        model: nn.Module | None = None,
        tok: Any = None,
        template: str | QueryTemplate | None = None,
        batch_size: int = 16,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.hparams = as_hparams(hparams)
        self.alg_name = self.hparams.alg_name
        self.method = self.hparams.method
        self.model, self.tok = model, tok
        self.template = template if template is not None else self.hparams.get("template")
        self.batch_size = (
            batch_size  # the Evaluator's batch size (EasyEdit's hparams.batch_size is the method's)
        )
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    @classmethod
    def from_hparams(cls, hparams: Any, **kwargs: Any) -> BaseEditor:
        return cls(hparams, **kwargs)

    def load(self) -> tuple[nn.Module, Any]:
        """``(model, tok)``: the given ones, or loaded once from ``hparams.model_name``."""
        if self.model is None or self.tok is None:
            name = self.hparams.get("model_name")
            if not name:
                raise HarnessError(
                    "no model_name in the hparams: set it or pass model= and tok=",
                    file=self.hparams.source,
                    field="model_name",
                )
            dtype = self.hparams.get("dtype") or ("float16" if self.hparams.get("fp16") else "float32")
            self.model, self.tok = load_model(
                str(name), dtype=dtype, device=_device(self.hparams.get("device")), cache_dir=self.cache_dir
            )
        return self.model, self.tok

    def batch_edit(
        self,
        prompts: str | Sequence[str],
        target_new: str | Sequence[str],
        ground_truth: str | Sequence[str] | None = None,
        subject: str | Sequence[str] | None = None,
        rephrase_prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        model: nn.Module | None = None,
        tok: Any = None,
        template: str | QueryTemplate | None = None,
        keep_original_weight: bool = False,
        sequential_edit: bool = False,
        verbose: bool = False,
    ) -> tuple[list[dict[str, Any]], nn.Module, Restore]:
        """Edit all requests, score them before and after, return ``(metrics, edited_model, restore)``.

        Arguments have EasyEdit's shapes (see :func:`prepare_requests`). Scoring is meg-harness's protocol:
        every question is wrapped in ``template`` (default: the model family's), locality is scored against
        the UNEDITED model's own greedy answers. ``metrics`` has one dict per request::

            {"case_id": i, "requested_rewrite": request, "time": fit seconds,
             "pre": STAGE, "post": STAGE}
            STAGE = {"rewrite_acc": [TF], "rewrite_ag": [AG], "rewrite_output": [greedy answer],
                     "rephrase_acc": [TF per rephrase], "rephrase_ag": [...], "rephrase_output": [...],
                     "locality": {"<key>_acc": [TF per probe], "<key>_ag": [...], "<key>_output": [...]}}

        TF is the token-level accuracy of ``" " + target`` under teacher forcing (the fraction of its
        tokens that are the argmax; EasyEdit's ``*_acc``), AG is 1.0 when the greedy answer exactly matches
        the target (after the protocol's normalisation), else 0.0. For locality the target is the unedited
        model's answer, so ``pre`` locality is 1.0 by construction. ``rephrase_*`` appear only for requests
        with rephrases.

        All requests are edited at once (the massive-editing protocol). ``sequential_edit=True`` fits the
        requests one at a time on the model as left by the previous fit (static weight edits only).
        ``keep_original_weight=True`` undoes the edit before returning (``restore`` is then a no-op).
        ``restore()`` undoes the edit: weight methods put the originals back, MeG removes its routing from the
        returned model (which, until then, routes plain ``model(...)``/``generate`` calls per row).
        """
        if model is not None or tok is not None:
            if model is None or tok is None:
                raise HarnessError("pass both model= and tok=", field="model")
            self.model, self.tok = model, tok
        model, tok = self.load()
        detach_routing(model)
        requests = prepare_requests(
            prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs
        )
        cases = [request_to_case(i, r) for i, r in enumerate(requests)]
        if not cases:
            raise HarnessError("no prompts given", field="prompts")
        resolved = resolve_template(template if template is not None else self.template, model, tok)
        evaluator = Evaluator(
            tok, resolved, batch_size=self.batch_size, cache_dir=self.cache_dir, progress=verbose
        )
        evaluator.check_inputs(model, cases)
        unedited = Edited(model, tok)
        labels = evaluator.locality_labels(unedited, cases, model_fingerprint(model))
        _, pre_items = evaluator.evaluate(unedited, cases, labels)

        started = time.perf_counter()
        edited = self._edit(model, tok, cases, resolved, sequential_edit, verbose)
        fit_s = time.perf_counter() - started
        _, post_items = evaluator.evaluate(edited, cases, labels)

        pre, post = _by_case(pre_items), _by_case(post_items)
        metrics = []
        for index, (request, case) in enumerate(zip(requests, cases)):
            entry = {
                "case_id": index,
                "requested_rewrite": request,
                "time": fit_s,
                "pre": _stage(case, pre.get(case.case_id, [])),
                "post": _stage(case, post.get(case.case_id, [])),
            }
            metrics.append(entry)
            if verbose:
                log.info("%d editing: %s -> %s  %s", index, case.prompt, case.target_new, entry["post"])
        restore = persist(edited, resolved, known_questions(cases))
        if keep_original_weight:
            restore()
        return metrics, model, restore

    def _edit(
        self,
        model: nn.Module,
        tok: Any,
        cases: Sequence[EditCase],
        template: QueryTemplate,
        sequential: bool,
        verbose: bool,
    ) -> Edited:
        if not sequential:
            return fit_editor(self.method, self.hparams, model, tok, cases, template, self.cache_dir, verbose)
        done: list[Edited] = []
        try:
            for case in cases:
                edited = fit_editor(
                    self.method, self.hparams, model, tok, [case], template, self.cache_dir, verbose
                )
                if is_per_row(edited):
                    raise HarnessError(
                        f"{self.alg_name} edits per query and fits all requests at once: "
                        "use sequential_edit=False",
                        field="sequential_edit",
                    )
                done.append(edited)
        except BaseException:
            for edited in reversed(done):
                edited.restore()
            raise
        return _Sequential(model, tok, done)


class _Sequential(Edited):
    """Static edits applied one after another; restore undoes them in reverse order."""

    def __init__(self, model: nn.Module, tok: Any, parts: Sequence[Edited]) -> None:
        super().__init__(model, tok)
        self.parts = list(parts)
        self.delta = _MergedOriginals(parts)

    def restore(self) -> None:
        for part in reversed(self.parts):
            part.restore()


class _MergedOriginals:
    """The earliest original of each changed tensor across sequential edits (for :class:`Restore`)."""

    def __init__(self, parts: Sequence[Edited]) -> None:
        self._originals: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, tensor in original_tensors(part).items():
                self._originals.setdefault(name, tensor)


def summary_metrics(metrics: Sequence[Mapping[str, Any]], stage: str = "post") -> dict[str, Any]:
    """The mean of each numeric field of ``stage`` (``post`` or ``pre``) over requests: a list field is
    averaged per request first (EasyEdit's way); requests without the field are skipped. Locality fields
    are nested under ``"locality"`` as in the per-request dicts."""

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    def collect(dicts: Iterator[Mapping[str, Any]]) -> dict[str, Any]:
        dicts = list(dicts)
        out: dict[str, Any] = {}
        names = dict.fromkeys(k for d in dicts for k in d)
        for name in names:
            values = [d[name] for d in dicts if name in d]
            if all(isinstance(v, Mapping) for v in values):
                nested = collect(iter(values))
                if nested:
                    out[name] = nested
                continue
            per_request = []
            for v in values:
                numbers = v if isinstance(v, list) else [v]
                numbers = [
                    float(x) for x in numbers if isinstance(x, (int, float)) and not isinstance(x, bool)
                ]
                if numbers:
                    per_request.append(mean(numbers))
            if per_request:
                out[name] = mean(per_request)
        return out

    return collect(m[stage] for m in metrics if stage in m)
