"""Persistent per-row routing: a per-query edit (MeG) applied to plain model calls, and the one rule that
recovers a row's question from its text (:func:`question_from_text`, shared by the EasyEdit-style API and
the lm-eval plugin).

:class:`RowRouting` hooks a model so that every ``model(input_ids=...)`` / ``model.generate`` call enters
``edited.rows(questions)`` with each row's question, recovered from the row's decoded tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meg_harness.editing.base import Edited
from meg_harness.errors import HarnessError
from meg_harness.prompts import QueryTemplate

_ROUTING_ATTR = "_meg_harness_routing"


def question_from_text(
    text: str, template: QueryTemplate | None, *, known: Sequence[str] = (), special: Sequence[str] = ()
) -> str:
    """The question a row is about (what per-row methods route on), from its decoded text
    (:class:`RowRouting`) or its context string (the lm-eval plugin's ``PerRowHFLM``).

    1. Templated text: when the text, after leading special tokens (BOS) and whitespace, starts with the
       template's prefix (the part before ``{}``; a non-empty one), the question is what follows the prefix up
       to the first occurrence of the template's suffix (the part after ``{}``): a teacher-forced target or
       generated tokens after the suffix are ignored.
    2. Otherwise (no template, a plain one, or a raw prompt as EasyEdit's own evaluation sends): the longest
       of ``known`` (the edit requests' prompts, rephrases and locality prompts) that the text starts with,
       so ``prompt + " " + target`` still routes on ``prompt``.
    3. Otherwise the whole text, special tokens at either end and surrounding whitespace removed.
    """
    body = _strip_special(text, special)
    prefix, _, suffix = template.text.partition("{}") if template is not None else ("", "", "")
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
