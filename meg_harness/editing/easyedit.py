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

from __future__ import annotations

import copy as copy_module
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meg_harness.data.edit_case import EditCase, LocalityProbe
from meg_harness.editing.base import Edited
from meg_harness.editing.registry import get_editor_class, list_methods
from meg_harness.errors import HarnessError
from meg_harness.evaluate.templates import QueryTemplate, get_template
from meg_harness.settings import with_base

log = logging.getLogger(__name__)

# Keys of an hparams file that configure this API (model loading, template), not the method itself.
API_KEYS = frozenset({"device", "dtype", "fp16", "model_parallel", "template"})
# EasyEdit's default ground truth when none is given.
NO_GROUND_TRUTH = "<|endoftext|>"
_SCIENTIFIC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")
_ROUTING_ATTR = "_meg_harness_routing"


# -- hyper-parameters ---------------------------------------------------------------------------------------
def _floats_from_scientific(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string; EasyEdit turns such strings into floats; so do we (nested)."""
    if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _floats_from_scientific(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_from_scientific(v) for v in value]
    return value


class HyperParams:
    """Hyper-parameters of any registered method, read from an EasyEdit-style YAML.

    Values are attributes (``hp.layers``, ``hasattr(hp, "batch_size")``) and items (``hp["lr"]``);
    ``alg_name`` (required) names the method: ``method`` is it lower-cased (``MEMIT`` -> ``memit``,
    ``AlphaEdit`` -> ``alphaedit``, ``MEG`` -> ``meg``). Values are validated by the method's own Editor when
    the object is built, so typos fail here with the file and field. ``device``, ``dtype``, ``fp16``,
    ``model_parallel`` and ``template`` configure loading/scoring and are not passed to the method.
    """

    def __init__(self, values: Mapping[str, Any], source: str | os.PathLike | None = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "source", None if source is None else str(source))

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_hparams(cls, path: str | os.PathLike) -> HyperParams:
        """Read an EasyEdit-style ``.yaml``/``.yml``/``.json`` file (``.yaml`` is appended when the path has
        no suffix and does not exist); a file may name a ``base:`` file it extends."""
        import yaml

        path = Path(path)
        if not path.exists() and not path.suffix:
            path = path.with_suffix(".yaml")
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except OSError as error:
            raise HarnessError(f"cannot read hparams: {error.strerror}", file=path) from None
        except (ValueError, yaml.YAMLError):
            raise HarnessError("not valid YAML/JSON", file=path) from None
        if not isinstance(data, dict):
            raise HarnessError("an hparams file must be a mapping", file=path)
        try:
            data = with_base(data)
        except HarnessError as error:
            raise HarnessError(error.reason, file=error.file or path, field=error.field) from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], source: str | os.PathLike | None = None) -> HyperParams:
        """From a mapping (a YAML's contents); checks ``alg_name`` and the method's own hparams."""
        hp = cls(_floats_from_scientific(dict(mapping)), source)
        hp.validate()
        return hp

    def validate(self) -> None:
        """A HarnessError naming the file and field for a missing/unknown ``alg_name`` or a bad value."""
        alg = self._values.get("alg_name")
        if not isinstance(alg, str) or not alg.strip():
            raise HarnessError("missing alg_name (e.g. MEMIT, FT, MEG)", file=self.source, field="alg_name")
        if self.method not in list_methods():
            raise HarnessError(
                f"unknown alg_name {alg!r}; known: {', '.join(list_methods())}",
                file=self.source,
                field="alg_name",
            )
        try:
            if self.method == "meg":
                from meg_harness.meg.hparams import MEGHyperParams

                MEGHyperParams.from_dict(self.editor_hparams())
            else:
                get_editor_class(self.method)(self.editor_hparams())
        except HarnessError as error:
            raise HarnessError(error.reason, file=self.source, field=error.field) from None

    # -- access -------------------------------------------------------------------------------------------
    @property
    def alg_name(self) -> str:
        return str(self._values["alg_name"])

    @property
    def method(self) -> str:
        """The registry name: ``alg_name`` lower-cased."""
        return self.alg_name.strip().lower()

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"hparams have no {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value  # EasyEdit sets e.g. ``hparams.device`` at run time

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HyperParams) and self._values == other._values

    def __repr__(self) -> str:
        return f"HyperParams({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        return copy_module.deepcopy(self._values)

    def editor_hparams(self) -> dict[str, Any]:
        """What the method's Editor is built from (the API-level keys removed)."""
        return {k: v for k, v in self.to_dict().items() if k not in API_KEYS}


def as_hparams(hparams: Any) -> HyperParams:
    """A :class:`HyperParams` from a HyperParams, a ``MEGHyperParams``, a mapping or a YAML path."""
    if isinstance(hparams, HyperParams):
        return hparams
    if isinstance(hparams, (str, os.PathLike)):
        return HyperParams.from_hparams(hparams)
    if isinstance(hparams, Mapping):
        return HyperParams.from_dict(hparams)
    to_dict = getattr(hparams, "to_dict", None)
    if callable(to_dict) and getattr(hparams, "alg_name", None):  # MEGHyperParams and look-alikes
        return HyperParams.from_dict(to_dict())
    raise HarnessError(
        "expected hparams (a HyperParams, MEGHyperParams, mapping or YAML path), "
        f"got {type(hparams).__name__}",
        field="hparams",
    )


# -- requests (EasyEdit's argument shapes) -> EditCases ------------------------------------------------------
def _as_list(value: Any, n: int, name: str) -> list[Any]:
    """``value`` as one entry per request: a str/None becomes ``[value] * n`` when n == 1 (EasyEdit)."""
    if value is None:
        return [None] * n
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if len(value) != n:
        raise HarnessError(f"{name} has {len(value)} entries for {n} prompts", field=name)
    return value


def prepare_requests(
    prompts: str | Sequence[str],
    target_new: str | Sequence[str],
    ground_truth: str | Sequence[str] | None = None,
    subject: str | Sequence[str] | None = None,
    rephrase_prompts: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
    locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """EasyEdit request dicts from ``batch_edit``'s arguments.

    ``rephrase_prompts``: one str or list of str per request. ``locality_inputs``:
    ``{key: {"prompt": [...], "ground_truth": [...]}}`` with one entry (a str, a list of str or None) per
    request.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    targets = _as_list(target_new, n, "target_new")
    truths = _as_list(ground_truth, n, "ground_truth")
    subjects = _as_list(subject, n, "subject")
    rephrases = _as_list(rephrase_prompts, n, "rephrase_prompts")
    requests: list[dict[str, Any]] = []
    for i in range(n):
        request: dict[str, Any] = {
            "prompt": prompts[i],
            "target_new": targets[i],
            "ground_truth": NO_GROUND_TRUTH if truths[i] is None else truths[i],
            "portability": {},
            "locality": {},
        }
        if subjects[i] is not None:
            request["subject"] = subjects[i]
        if rephrases[i] is not None:
            request["rephrase_prompt"] = rephrases[i]
        requests.append(request)
    for key, spec in (locality_inputs or {}).items():
        if not isinstance(spec, Mapping) or "prompt" not in spec:
            raise HarnessError(f"locality_inputs[{key!r}] needs a 'prompt' list", field="locality_inputs")
        field_name = f"locality_inputs.{key}"
        loc_prompts = _as_list(spec["prompt"], n, f"{field_name}.prompt")
        loc_truths = _as_list(spec.get("ground_truth"), n, f"{field_name}.ground_truth")
        for request, p, t in zip(requests, loc_prompts, loc_truths):
            if p is not None:
                request["locality"][key] = {"prompt": p, "ground_truth": t}
    return requests


def _text(value: Any, field_name: str, index: int) -> str:
    """A request's string value (EasyEdit/ROME also write targets as ``{"str": ...}``)."""
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise HarnessError(f"expected a non-empty string, got {value!r}", record=index, field=field_name)
    return value


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def request_to_case(index: int, request: Mapping[str, Any]) -> EditCase:
    """One EasyEdit request dict as an EditCase (``case_id`` = its index; locality keys kept in ``extra``)."""
    prompt = _text(request.get("prompt"), "prompt", index)
    target = _text(request.get("target_new"), "target_new", index).strip()
    truth = request.get("ground_truth")
    truth = truth.get("str") if isinstance(truth, Mapping) else truth
    truth = (_strings(truth) or [None])[0]
    subject = request.get("subject") or ""
    rephrases = tuple(_strings(request.get("rephrase_prompt")))
    probes, keys = [], []
    for key, spec in (request.get("locality") or {}).items():
        golds = spec.get("ground_truth")
        golds = golds if isinstance(golds, list) else [golds]
        for j, p in enumerate(_strings(spec.get("prompt"))):
            gold = golds[j] if j < len(golds) else None
            gold = (_strings(gold) or [None])[0]  # EasyEdit allows a list of answers: keep the first
            probes.append(LocalityProbe(p, gold))
            keys.append(key)
    return EditCase(
        case_id=str(index),
        prompt=prompt,
        subject=subject,
        target_new=target,
        target_true=None if truth in (None, NO_GROUND_TRUTH) else truth,
        rephrases=rephrases,
        locality=tuple(probes),
        prompt_template=prompt.replace(subject, "{}", 1) if subject and subject in prompt else None,
        extra={"locality_keys": keys},
    )


# -- the template --------------------------------------------------------------------------------------------
def resolve_template(template: str | QueryTemplate | None, model: nn.Module, tok: Any) -> QueryTemplate:
    """``template`` (a name, a text with ``{}``, or a QueryTemplate), else the model family's default."""
    if isinstance(template, QueryTemplate):
        return template
    if template is None:
        from meg_harness.models.adapters import get_adapter

        template = get_adapter(model).default_template(model, tok)
    return get_template(template)


# -- persistent per-row routing ------------------------------------------------------------------------------
def question_from_text(
    text: str, template: QueryTemplate, *, known: Sequence[str] = (), special: Sequence[str] = ()
) -> str:
    """The question a decoded row is about (what per-row methods route on).

    1. Templated text: when the text, after leading special tokens (BOS) and whitespace, starts with the
       template's prefix (the part before ``{}``; a non-empty one), the question is what follows the prefix up
       to the first occurrence of the template's suffix (the part after ``{}``): a teacher-forced target or
       generated tokens after the suffix are ignored.
    2. Otherwise (a plain template, or a raw prompt as EasyEdit's own evaluation sends): the longest of
       ``known`` (the edit requests' prompts, rephrases and locality prompts) that the text starts with, so
       ``prompt + " " + target`` still routes on ``prompt``.
    3. Otherwise the whole text, special tokens at either end and surrounding whitespace removed.
    """
    body = _strip_special(text, special)
    prefix, _, suffix = template.text.partition("{}")
    if prefix:
        start = body.lstrip() if not prefix[:1].isspace() else body
        if start.startswith(prefix):
            rest = start[len(prefix) :]
            cut = rest.find(suffix) if suffix else -1
            return rest[:cut] if cut >= 0 else rest
    stripped = body.strip()
    for question in sorted(known, key=len, reverse=True):
        if question and (body.startswith(question) or stripped.startswith(question.strip())):
            return question
    return stripped


def _strip_special(text: str, special: Sequence[str]) -> str:
    """``text`` without special-token strings (BOS, EOS, pad) at its start and end."""
    tokens = sorted((s for s in special if s), key=len, reverse=True)
    changed = True
    while changed:
        changed = False
        for s in tokens:
            if text.lstrip().startswith(s):
                text, changed = text.lstrip()[len(s) :], True
            if text.rstrip().endswith(s):
                text, changed = text.rstrip()[: -len(s)], True
    return text


def _cache_length(past: Any) -> int:
    """Tokens already in a KV cache (a transformers Cache or a legacy tuple); 0 when empty or absent."""
    if past is None:
        return 0
    length = getattr(past, "get_seq_length", None)
    if callable(length):
        return int(length())
    try:
        return int(past[0][0].shape[-2]) if len(past) else 0
    except (TypeError, IndexError, AttributeError):
        return 0


def _kv_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a forward call received: ``past_key_values`` (transformers <= 5.23) or ``cache``."""
    cache = kwargs.get("past_key_values")
    return cache if cache is not None else kwargs.get("cache")


def _template_special(tokenizer: Any, template: QueryTemplate) -> list[str]:
    """Special-token strings to strip, except those the template itself uses (ChatML's ``<|im_start|>``)."""
    special = list(getattr(tokenizer, "all_special_tokens", []) or [])
    return [s for s in special if s not in template.text]


class RowRouting:
    """Per-row modifications for plain model calls: a forward pre-hook + forward hook pair on the model.

    Before each forward, every row's non-padding tokens (by ``attention_mask``; left or right padding) are
    decoded and the row's question recovered by :func:`question_from_text`; ``edited.rows(questions)`` is
    entered for that forward and left in the post-hook (which runs even when the forward raises). An
    incremental decoding step (a non-empty KV cache: ``past_key_values``, or ``cache`` from transformers
    5.24 on) reuses the questions of the previous full (prefill) call. At most one routing is installed per
    model: installing replaces the old one.
    """

    def __init__(self, edited: Edited, template: QueryTemplate, known: Sequence[str] = ()) -> None:
        self.edited = edited
        self.model: nn.Module = edited.model
        self.tokenizer = edited.tokenizer
        self.template = template
        self.known = tuple(dict.fromkeys(known))
        self.special = _template_special(self.tokenizer, template)
        self.last_questions: list[str] | None = None
        self._open: list[Any] = []  # one entry per forward in flight: its rows() context, or None
        self._handles: list[Any] = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[str]:
        """The question of each row of a full (non-incremental) call."""
        ids = input_ids.detach().cpu()
        if attention_mask is not None and tuple(attention_mask.shape) == tuple(ids.shape):
            mask = attention_mask.detach().cpu().bool()
            rows = [row[m].tolist() for row, m in zip(ids, mask)]
        else:
            rows = [row.tolist() for row in ids]
        texts = self.tokenizer.batch_decode(
            rows, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return [question_from_text(t, self.template, known=self.known, special=self.special) for t in texts]

    def _pre(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._open.append(None)  # placeholder: the post-hook pops it even if this hook raises
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise HarnessError(
                "per-row routing needs input_ids (not inputs_embeds) to know each row's question",
                field="input_ids",
            )
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        past = _cache_length(_kv_cache(kwargs)) > 0
        if past:
            questions = self.last_questions
            if questions is None or len(questions) != input_ids.shape[0]:
                raise HarnessError(
                    f"an incremental step of {input_ids.shape[0]} rows without a prefill of the same batch",
                    field="past_key_values",
                )
        else:
            questions = self.questions(input_ids, kwargs.get("attention_mask"))
            self.last_questions = questions
        context = self.edited.rows(questions)
        context.__enter__()
        self._open[-1] = context

    def _post(self, _module: nn.Module, _args: tuple, _kwargs: dict, _output: Any) -> None:
        context = self._open.pop() if self._open else None
        if context is not None:
            context.__exit__(None, None, None)

    def install(self) -> RowRouting:
        """Register the hooks (removing any routing already on the model)."""
        detach_routing(self.model)
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]
        object.__setattr__(self.model, _ROUTING_ATTR, self)
        return self

    def remove(self) -> None:
        """Remove the hooks (and leave any rows() context still open)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        while self._open:
            context = self._open.pop()
            if context is not None:
                context.__exit__(None, None, None)
        if getattr(self.model, _ROUTING_ATTR, None) is self:
            object.__delattr__(self.model, _ROUTING_ATTR)


def detach_routing(model: nn.Module) -> bool:
    """Remove the :class:`RowRouting` installed on ``model``, if any; True when one was removed."""
    routing = getattr(model, _ROUTING_ATTR, None)
    if routing is None:
        return False
    routing.remove()
    return True


def is_per_row(edited: Edited) -> bool:
    """Whether ``edited`` modifies rows per question (overrides :meth:`Edited.rows`), like MeG."""
    return type(edited).rows is not Edited.rows


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


def _originals(edited: Edited) -> dict[str, torch.Tensor]:
    delta = getattr(edited, "delta", None)
    return dict(getattr(delta, "_originals", None) or {})


def persist(edited: Edited, template: QueryTemplate, known: Sequence[str] = ()) -> Restore:
    """Make ``edited`` act on plain model calls: per-row methods get a :class:`RowRouting` (restore removes
    it); static weight edits are already in the weights (restore puts the originals back)."""
    if is_per_row(edited):
        routing = RowRouting(edited, template, known).install()
        return Restore(routing.remove, {}, edited, routing)
    return Restore(edited.restore, _originals(edited), edited)


# -- apply functions (EasyEdit's signature) ------------------------------------------------------------------
def _known_questions(cases: Sequence[EditCase]) -> list[str]:
    return [q for c in cases for q in (c.prompt, *c.rephrases, *(p.prompt for p in c.locality))]


def _fit(
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
        edited = _fit(method, hp, model, tok, cases, resolved, cache_dir, verbose)
    return model, persist(edited, resolved, _known_questions(cases))


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


# -- BaseEditor ---------------------------------------------------------------------------------------------
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
            from meg_harness.models import load_model

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
        from meg_harness.evaluate.evaluator import Evaluator
        from meg_harness.models.loading import model_fingerprint

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
        restore = persist(edited, resolved, _known_questions(cases))
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
            return _fit(self.method, self.hparams, model, tok, cases, template, self.cache_dir, verbose)
        done: list[Edited] = []
        try:
            for case in cases:
                edited = _fit(
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
            for name, tensor in _originals(part).items():
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
